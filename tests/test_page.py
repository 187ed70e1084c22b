"""The page's files and the language list over plain HTTP, and the whole server over TLS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from asrlive.engine import LANGUAGES
from asrlive.web import ServerOptions

from .serving import TIMEOUT, raw_session, running_server, start_message


def _get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT, context=context) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


async def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, str, bytes]:
    return await asyncio.wait_for(asyncio.to_thread(_get, url, context), TIMEOUT)


@pytest.mark.asyncio
async def test_the_page_and_its_files_are_served(load_model):
    async with running_server(load_model("hf")) as server:
        base = f"http://127.0.0.1:{server.port}"
        index = await get(base + "/")
        files = {path: await get(base + path) for path in ("/app.js", "/pcm-worklet.js", "/style.css")}
        languages = await get(base + "/v1/languages")
        missing = [await get(base + path) for path in ("/nope.js", "/static/app.js", "/../web/_server.py")]
    assert index[:2] == (200, "text/html; charset=utf-8") and b'<script type="module" src="/app.js">' in index[2]
    assert files["/app.js"][1] == files["/pcm-worklet.js"][1] == "text/javascript; charset=utf-8"
    assert b'registerProcessor("pcm16k"' in files["/pcm-worklet.js"][2] and files["/style.css"][0] == 200
    expected = {"languages": list(LANGUAGES), "timestamps": False}  # no aligner: no word timestamps
    assert languages[:2] == (200, "application/json") and json.loads(languages[2]) == expected
    assert {status for status, _, _ in missing} == {404}


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "asrlive test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return certfile, keyfile


@pytest.mark.asyncio
async def test_tls_serves_the_page_over_https_and_sessions_over_wss(load_model, tmp_path):
    certfile, keyfile = self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=str(certfile))
    async with running_server(load_model("hf"), certfile=str(certfile), keyfile=str(keyfile)) as server:
        assert server.url.startswith("wss://") and server.page_url.startswith("https://")
        page = await get(server.page_url, trust)
        session = await raw_session(server.url, [start_message(), json.dumps({"type": "finish"})], ssl=trust)
    assert page[0] == 200 and b"asrlive" in page[2]
    assert session.types == ["ready", "done"] and session.close_code == 1000


def test_tls_options_are_checked_up_front(tmp_path):
    certfile, keyfile = self_signed(tmp_path)
    with pytest.raises(ValueError, match="go together"):
        ServerOptions(certfile=str(certfile))
    with pytest.raises(ValueError, match="cannot load the TLS certificate"):
        ServerOptions(certfile=str(certfile), keyfile=str(tmp_path / "missing.pem"))


def test_allowed_origins_are_origins():
    options = ServerOptions(allowed_origins=("HTTPS://Captions.Example/", "https://a.example:443", "http://b:8080"))
    assert options.allowed_origins == ("https://captions.example", "https://a.example", "http://b:8080")
    for wrong in ("captions.example", "https://a.example/page", "null", "*", "https://a.example:port"):
        with pytest.raises(ValueError, match="is no origin"):
            ServerOptions(allowed_origins=(wrong,))
