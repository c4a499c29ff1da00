"""How bytes reach the daemon: the Unix socket (default) or TLS over TCP, for both ends.

The server side parses ``--listen`` (refusing any form that is not TLS with a secret) and sets up the
certificate and the connection file (:func:`prepare_listeners`); the client side opens a connection to a
:class:`~sdrepl.daemon.auth.RemoteEndpoint` with the certificate pinned before any byte of the protocol,
so the secret is never sent to a daemon other than the one the connection file names.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket as socket_mod
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdrepl.core.errors import UsageError
from sdrepl.daemon import protocol
from sdrepl.daemon.auth import RemoteEndpoint, new_key, parse_host_port, reusable_key
from sdrepl.daemon.tls import TlsError, check_pin, client_context, ensure_certificate, server_context

#: Seconds a TCP client has for the TLS handshake and then for a valid ``hello`` with its key.
AUTH_TIMEOUT_S = 10.0
#: Longest line accepted before a connection has authenticated (a hello is a few hundred bytes).
PREAUTH_LINE = 64 * 1024
#: Schemes ``--listen`` refuses, with the reason (nothing weaker than TLS + secret is offered).
PLAIN_SCHEMES = ("tcp://", "http://", "ws://", "plain://")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(text: str) -> tuple[str, int]:
    """One ``--listen`` value: ``HOST:PORT`` or ``tls://HOST:PORT``; plain TCP is refused everywhere."""
    value = text.strip()
    lowered = value.lower()
    for scheme in PLAIN_SCHEMES:
        if lowered.startswith(scheme):
            host = value[len(scheme):]
            where = "" if is_loopback(host.rpartition(":")[0].strip("[]")) else " (and on a non-loopback address " \
                "anyone on the network could drive the daemon and read its pictures)"
            raise UsageError(f"--listen {text}: plain TCP without TLS and a secret is refused{where}; give "
                             f"--listen {host} (TLS, with a secret in the connection file)")
    value = value[len("tls://"):] if lowered.startswith("tls://") else value
    return parse_host_port(value, "--listen")


@dataclass
class ListenPlan:
    """What the daemon needs to open its TCP listeners."""

    addresses: list[tuple[str, int]]
    ssl_context: ssl.SSLContext
    fingerprint: str
    key: str
    connection_file: Path


def prepare_listeners(settings: Any) -> ListenPlan | None:
    """Certificate (made on first start unless given), fingerprint, secret: None without ``--listen``."""
    if not settings.listen:
        return None
    addresses = [parse_listen(text) for text in settings.listen]
    cert, key_file = settings.tls_cert, settings.tls_key
    if (cert is None) != (key_file is None):
        raise UsageError("--tls-cert and --tls-key go together (a certificate and its private key); give both, or "
                         "neither for a self-signed certificate made on first start")
    if cert is None:
        folder = settings.socket.parent
        cert, key_file = folder / "sdrepl-tls-cert.pem", folder / "sdrepl-tls-key.pem"
        ensure_certificate(cert, key_file, [host for host, _ in addresses])
    try:
        context, fingerprint = server_context(Path(cert), Path(key_file))
    except TlsError as exc:
        raise UsageError(str(exc)) from None
    connection_file = settings.remote_connection_file
    key = reusable_key(connection_file) or new_key()
    return ListenPlan(addresses, context, fingerprint, key, connection_file)


# --- client side ---------------------------------------------------------------------------------------

def _peer_der(ssl_object: Any) -> bytes | None:
    return ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None


async def open_remote(endpoint: RemoteEndpoint, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection with the pinned certificate checked (:class:`TlsError` for the wrong one)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        endpoint.host, endpoint.port, ssl=client_context(), server_hostname=endpoint.host,
        limit=protocol.MAX_LINE, ssl_handshake_timeout=timeout), timeout)
    try:
        check_pin(_peer_der(writer.get_extra_info("ssl_object")), endpoint.fingerprint, str(endpoint))
    except TlsError:
        writer.close()
        raise
    return reader, writer


def open_remote_sync(endpoint: RemoteEndpoint, timeout: float) -> ssl.SSLSocket:
    """The blocking form of :func:`open_remote` (``status``, ``stop``, probes)."""
    raw = socket_mod.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    try:
        sock = client_context().wrap_socket(raw, server_hostname=endpoint.host)
        check_pin(_peer_der(sock), endpoint.fingerprint, str(endpoint))
    except BaseException:
        raw.close()
        raise
    return sock
