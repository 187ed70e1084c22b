"""A real HAProxy (Debian's ``haproxy``) in front of ``asrlive serve`` replicas, on loopback.

The test binds the balancer's listening socket itself (port 0) and hands it to HAProxy
(``bind fd@N``), so no port is guessed. HAProxy routes by readiness: its check is ``option httpchk
GET /readyz``, which it sends as HTTP/1.0. Its runtime API (a unix socket) reads the servers'
states and pauses checks or servers, to put the balancer where a test needs it.
"""

from __future__ import annotations

import asyncio
import csv
import io
import shutil
import socket
from pathlib import Path

TIMEOUT = 60.0
BACKEND = "replicas"

CONFIG = """\
global
    stats socket {admin} level admin
    log stderr format short local0 notice

defaults
    mode http
    log global
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    retries 3
    option redispatch

frontend asrlive
    bind fd@{fd}
    default_backend {backend}

backend {backend}
    balance leastconn
    option httpchk GET /readyz
    default-server check inter 100ms fall 1 rise 1
{servers}
"""


def haproxy_missing() -> str | None:
    return None if shutil.which("haproxy") else "needs HAProxy (Debian: apt-get install haproxy; see .ci/run)"


class HAProxy:
    """``async with HAProxy(ports, workdir) as balancer``: servers ``r0``, ``r1``, ... in ``ports``' order."""

    def __init__(self, ports: list[int], workdir: Path) -> None:
        self.names = [f"r{index}" for index in range(len(ports))]
        self._ports = ports
        self._workdir = workdir
        self._admin = workdir / "admin.sock"
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._process: asyncio.subprocess.Process | None = None
        self.log: list[str] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._listener.getsockname()[1]}/v1/stream"

    async def __aenter__(self) -> HAProxy:
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.set_inheritable(True)
        servers = "\n".join(f"    server {n} 127.0.0.1:{p}" for n, p in zip(self.names, self._ports, strict=True))
        config = self._workdir / "haproxy.cfg"
        fields = {"admin": self._admin, "fd": self._listener.fileno(), "backend": BACKEND, "servers": servers}
        config.write_text(CONFIG.format(**fields))
        self._process = await asyncio.create_subprocess_exec(
            "haproxy", "-db", "-f", str(config), pass_fds=(self._listener.fileno(),), stderr=asyncio.subprocess.PIPE
        )
        self._reader = asyncio.create_task(self._read())
        await self.until(lambda states: all(state == "UP" for state in states.values()))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._process is not None
        if self._process.returncode is None:
            self._process.terminate()
        await asyncio.wait_for(self._process.wait(), TIMEOUT)
        await asyncio.wait_for(self._reader, TIMEOUT)
        self._listener.close()

    async def _read(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        async for line in self._process.stderr:
            self.log.append(line.decode(errors="replace").rstrip())

    async def command(self, line: str) -> str:
        """One runtime API command; its answer."""
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self._admin)), TIMEOUT)
        try:
            writer.write(line.encode() + b"\n")
            return (await asyncio.wait_for(reader.read(), TIMEOUT)).decode()
        finally:
            writer.close()

    async def states(self) -> dict[str, str]:
        """Each server's state as HAProxy sees it: UP, DOWN, MAINT, ... (the check's verdict)."""
        if not self._admin.exists():
            return {}
        try:
            answer = await self.command("show stat")
        except OSError:  # not listening yet
            return {}
        rows = csv.DictReader(io.StringIO(answer.lstrip("# ")))
        return {
            row["svname"]: row["status"] for row in rows if row["pxname"] == BACKEND and row["svname"] in self.names
        }

    async def until(self, condition, timeout: float = TIMEOUT) -> dict[str, str]:
        """Poll the servers' states every 20 ms until ``condition(states)`` holds."""

        async def poll() -> dict[str, str]:
            while not (states := await self.states()) or not condition(states):
                assert self._process is not None and self._process.returncode is None, "\n".join(self.log)
                await asyncio.sleep(0.02)
            return states

        return await asyncio.wait_for(poll(), timeout)
