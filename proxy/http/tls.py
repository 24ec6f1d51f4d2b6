"""HTTPS on the data port: the TLS context made from ``server.tls_cert_file`` and
``server.tls_key_file`` (and ``server.tls_client_ca_file`` for mutual TLS between
internal services), reloaded in place on SIGHUP.

A modern configuration, after Mozilla's "intermediate" profile: TLS 1.2 and 1.3 only,
forward-secret AEAD ciphers for 1.2 (1.3's are all such), no compression, no
renegotiation.  Reloading loads the new certificate and key into the same context: the
listening socket keeps it, and every handshake after the reload uses the new pair.
"""

from __future__ import annotations

import ssl

from ..config import ConfigError, ServerConfig

_TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))


def server_context(cfg: ServerConfig) -> ssl.SSLContext | None:
    """The data port's TLS context, or None when ``server.tls_cert_file`` is not set.
    Raises ConfigError naming the key when a file cannot be read or the key does not
    match the certificate."""
    if cfg.tls_cert_file is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    load(ctx, cfg)
    return ctx


def load(ctx: ssl.SSLContext, cfg: ServerConfig) -> None:
    """Load ``cfg``'s certificate, key and client CA into ``ctx`` (at start, and on reload)."""
    assert cfg.tls_cert_file is not None and cfg.tls_key_file is not None
    try:
        ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise ConfigError([f"server.tls_key_file: {cfg.tls_key_file} is not the key of the certificate in "
                                   f"server.tls_cert_file ({cfg.tls_cert_file})"]) from None
            raise ConfigError([f"server.tls_cert_file/tls_key_file: not a PEM certificate and its key "
                               f"({exc.reason or exc})"]) from None
        raise ConfigError([f"server.tls_cert_file/tls_key_file: cannot read {exc.filename}: "
                           f"{exc.strerror}"]) from None
    if cfg.tls_client_ca_file is None:
        ctx.verify_mode = ssl.CERT_NONE
        return
    try:
        ctx.load_verify_locations(cafile=cfg.tls_client_ca_file)
    except (OSError, ValueError) as exc:
        raise ConfigError([f"server.tls_client_ca_file: cannot load {cfg.tls_client_ca_file} as PEM "
                           f"certificates ({getattr(exc, 'reason', None) or exc})"]) from None
    ctx.verify_mode = ssl.CERT_REQUIRED


def check_reload(ctx: ssl.SSLContext | None, cfg: ServerConfig) -> None:
    """Whether a reloaded config's TLS files can replace the running ones (``load`` does,
    once the rest of the config is in force).  Turning TLS on or off needs a restart: the
    listening socket was made with or without it.  The files are checked on a context of
    their own: a key that does not match would otherwise leave the live context with the
    new certificate and the old key."""
    if (ctx is None) != (cfg.tls_cert_file is None):
        raise ConfigError(["server.tls_cert_file: turning HTTPS on or off needs a restart (the config was not "
                           "applied)"])
    if ctx is not None:
        server_context(cfg)
