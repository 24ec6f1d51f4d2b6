"""HTTPS on the data port (server.tls_cert_file / tls_key_file, tls_client_ca_file for
mutual TLS), with throwaway certificates: a modern configuration, the certificate
reloaded in place, and a clear refusal of files that do not fit together."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config import ConfigError, load_config
from proxy.http.app import start_gateway
from proxy.tools.devstack import free_port

from ..fix_gateway import KEY_A, TENANT_A, base_config, make_settings, merge
from ..fix_stack import Stack


def _certificate(directory: Path, name: str, *, ca: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    """A key and a certificate for 127.0.0.1, self-signed or signed by ``ca``."""
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    if ca is None:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                        str(cert)], check=True, capture_output=True)
        return key, cert
    csr = directory / f"{name}.csr"
    subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                    "-keyout", str(key), "-out", str(csr)], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
                    "-CAcreateserial", "-days", "2", "-out", str(cert)], check=True, capture_output=True)
    return key, cert


def _client(trust: Path, cert: tuple[Path, Path] | None = None,
            maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(trust))
    if cert is not None:
        ctx.load_cert_chain(str(cert[1]), str(cert[0]))
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


async def _query(port: int, ctx: ssl.SSLContext | None, scheme: str = "https") -> tuple[int, Any]:
    """(status, body) of one SELECT as tenant A."""
    async with aiohttp.ClientSession() as session, session.post(
            f"{scheme}://127.0.0.1:{port}/v1/query", ssl=ctx if ctx is not None else False,
            json={"sql": "SELECT current_setting('app.tenant_id') AS t"},
            headers={"Authorization": f"Bearer {KEY_A}"}) as r:
        return r.status, await r.json()


async def _presented(port: int) -> str:
    """The SHA-256 of the certificate a new handshake on ``port`` presents."""
    pem = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", port))
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def _fingerprint(cert: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    return hashlib.sha256(der).hexdigest()


async def test_https_with_a_modern_configuration(stack: Stack, tmp_path: Path) -> None:
    key, cert = _certificate(tmp_path, "gateway")
    settings = make_settings(stack, server={"tls_cert_file": str(cert), "tls_key_file": str(key)})
    running = await start_gateway(settings)
    try:
        status, body = await _query(running.port, _client(cert))
        assert status == 200 and body["rows"] == [{"t": TENANT_A}]
        assert await _presented(running.port) == _fingerprint(cert)
        with pytest.raises(aiohttp.ClientError):  # plain HTTP on the HTTPS port
            await _query(running.port, None, scheme="http")
        # TLS 1.2 at least, forward-secret AEAD ciphers for 1.2, no compression
        context = running.gateway.tls
        assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.options & ssl.OP_NO_COMPRESSION
        assert {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"} <= {
            "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
            "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305"}
        assert (await _query(running.port, _client(cert, maximum=ssl.TLSVersion.TLSv1_2)))[0] == 200
        async with aiohttp.ClientSession() as session, session.get(  # the admin port stays plain HTTP
                f"http://127.0.0.1:{running.admin_port}/healthz") as r:
            assert r.status == 200
    finally:
        await running.stop()


async def test_mutual_tls_requires_a_client_certificate_signed_by_the_ca(stack: Stack, tmp_path: Path) -> None:
    ca = _certificate(tmp_path, "ca")
    key, cert = _certificate(tmp_path, "gateway")
    client = _certificate(tmp_path, "svc-a", ca=ca)
    stranger = _certificate(tmp_path, "stranger")
    settings = make_settings(stack, server={"tls_cert_file": str(cert), "tls_key_file": str(key),
                                            "tls_client_ca_file": str(ca[1])})
    running = await start_gateway(settings)
    try:
        assert (await _query(running.port, _client(cert, client)))[0] == 200
        for without in (None, stranger):
            with pytest.raises(aiohttp.ClientError):
                await _query(running.port, _client(cert, without))
    finally:
        await running.stop()


async def test_the_certificate_is_reloaded_on_sighup_and_a_bad_one_is_refused(stack: Stack, tmp_path: Path) -> None:
    key, cert = _certificate(tmp_path, "gateway")
    first = _fingerprint(cert)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(merge(base_config(stack), {"server": {
        "tls_cert_file": str(cert), "tls_key_file": str(key)}})))
    running = await start_gateway(load_config(config, {}), config)
    try:
        # a key that is not the certificate's: the reload is refused, the old pair stays
        other_key, _ = _certificate(tmp_path, "other")
        key.write_bytes(other_key.read_bytes())
        problems = await running.gateway.reload()
        assert problems and "is not the key of the certificate" in problems[0]
        assert await _presented(running.port) == first
        # a good new pair in a config that is refused for another reason (its Redis does not
        # answer): the whole reload is refused, the certificate included
        _certificate(tmp_path, "unused")
        (tmp_path / "unused.key").replace(key)
        (tmp_path / "unused.crt").replace(cert)
        config.write_text(yaml.safe_dump(merge(base_config(stack), {
            "server": {"tls_cert_file": str(cert), "tls_key_file": str(key)},
            "limits": {"redis_url": f"redis://127.0.0.1:{free_port()}/0"}})))
        problems = await running.gateway.reload()
        assert problems and "does not answer" in problems[0]
        assert await _presented(running.port) == first
        config.write_text(yaml.safe_dump(merge(base_config(stack), {"server": {
            "tls_cert_file": str(cert), "tls_key_file": str(key)}})))
        # a new pair: the next handshake presents it
        _certificate(tmp_path, "gateway")
        second = _fingerprint(cert)
        assert second != first
        assert await running.gateway.reload() == []
        assert (await _query(running.port, _client(cert)))[0] == 200
        assert await _presented(running.port) == second
    finally:
        await running.stop()


def test_a_key_that_does_not_match_its_certificate_is_refused(stack: Stack, tmp_path: Path) -> None:
    _, cert = _certificate(tmp_path, "gateway")
    other_key, _ = _certificate(tmp_path, "other")
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(merge(base_config(stack), {"server": {
        "tls_cert_file": str(cert), "tls_key_file": str(other_key)}})))
    for command in ("check-config", "serve"):
        done = subprocess.run([sys.executable, "-m", "proxy", command, "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        assert "server.tls_key_file" in done.stderr and "is not the key of the certificate" in done.stderr
    half = merge(base_config(stack), {"server": {"tls_cert_file": str(cert)}})
    with pytest.raises(ConfigError, match=r"server\.tls_cert_file and server\.tls_key_file go together"):
        make_settings(stack, server=half["server"])
