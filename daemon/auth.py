"""Who may talk to a TCP listener: the secret, the remote connection file, and a client's endpoint.

jupyter's model: the daemon writes a JSON file, owner-only (0600 from its first byte), with the host,
port, the TLS certificate's fingerprint and a random secret key. A client given that file (``sdrepl
--connect FILE``), or ``SDREPL_HOST`` + ``SDREPL_TOKEN`` + ``SDREPL_FINGERPRINT``, pins the fingerprint
and sends the key in its ``hello``; the daemon compares keys with :func:`hmac.compare_digest` and serves
nothing else before that. The key is kept across restarts (copy the file once); delete the file to make a
new one.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdrepl import __version__
from sdrepl.core.errors import SdreplError, UsageError
from sdrepl.daemon.tls import normal_fingerprint, write_private

#: Bytes of randomness in a generated secret (256 bits; sent base64url).
KEY_BYTES = 32
#: Shortest secret the daemon accepts from a file it reuses (a hand-made weak key is replaced).
MIN_KEY_CHARS = 32
#: Largest connection file read (it is a few hundred bytes).
MAX_FILE = 64 * 1024


class AuthFailed(SdreplError):
    """A TCP client sent no secret, a wrong one, or a request before its ``hello``: refused, connection closed."""


@dataclass(frozen=True)
class RemoteEndpoint:
    """Where a remote daemon listens and how to trust it: the client's side of a connection file."""

    host: str
    port: int
    fingerprint: str
    key: str
    source: str  # "connection file PATH" or "SDREPL_HOST": named in error messages

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tls://{host}:{self.port}"


def keys_match(given: Any, expected: str) -> bool:
    """Constant-time comparison of a client's key with the daemon's (anything but a string is wrong)."""
    if not isinstance(given, str) or not given:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


def new_key() -> str:
    return secrets.token_urlsafe(KEY_BYTES)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE + 1)
    except OSError as exc:
        raise UsageError(f"cannot read the connection file {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_FILE:
        raise UsageError(f"{path} is larger than a connection file ({MAX_FILE} bytes at most)")
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path} is not a connection file (not JSON: {exc})") from exc
    if not isinstance(value, dict):
        raise UsageError(f"{path} is not a connection file (JSON, but not an object)")
    return value


def reusable_key(path: Path) -> str | None:
    """The key of an existing connection file of ours (owner-only, ours, long enough), else None."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if not os.path.isfile(path) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None
    try:
        key = _read_json(path).get("key")
    except UsageError:
        return None
    return key if isinstance(key, str) and len(key) >= MIN_KEY_CHARS else None


def write_connection_file(path: Path, *, listeners: list[tuple[str, int]], fingerprint: str, key: str,
                          socket: Path) -> None:
    """The remote connection file: the first listener's host/port for clients, every listener, the pin, the key."""
    host, port = listeners[0]
    data = {"transport": "tls", "host": host, "port": port, "fingerprint": fingerprint, "key": key,
            "listen": [f"{h}:{p}" for h, p in listeners], "pid": os.getpid(), "version": __version__,
            "socket": str(socket), "started": time.time()}
    write_private(path, (json.dumps(data, indent=1) + "\n").encode("utf-8"))


def endpoint_from_file(path: Path) -> RemoteEndpoint:
    """A client's endpoint from a connection file (``--connect FILE``); a clear error for a bad one."""
    path = Path(path).expanduser()
    data = _read_json(path)
    where = f"connection file {path}"
    host, port, fingerprint, key = data.get("host"), data.get("port"), data.get("fingerprint"), data.get("key")
    if not isinstance(host, str) or not host or isinstance(port, bool) or not isinstance(port, int) \
            or not 0 < port < 65536:
        raise UsageError(f"{where} has no valid host and port; copy it again from the daemon's machine")
    if not isinstance(key, str) or not key:
        raise UsageError(f"{where} has no key; copy it again from the daemon's machine")
    if not isinstance(fingerprint, str):
        raise UsageError(f"{where} has no certificate fingerprint; copy it again from the daemon's machine")
    if host in ("0.0.0.0", "::"):  # the daemon listens on every address: the file's reader picks the machine
        host = "127.0.0.1"
    return RemoteEndpoint(host, port, normal_fingerprint(fingerprint), key, where)


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` (PORT 0 = any free port, for a listener)."""
    value = text.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        ok = bool(sep)
    else:
        host, ok, port_text = value.rpartition(":")[0], ":" in value, value.rpartition(":")[2]
    if not ok or not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise UsageError(f"{what} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:7860 or [::1]:7860")
    return host, int(port_text)


def endpoint_from_env(env: dict[str, str]) -> RemoteEndpoint | None:
    """``SDREPL_HOST`` + ``SDREPL_TOKEN`` + ``SDREPL_FINGERPRINT`` (all three, or a clear error), else None."""
    hostport = env.get("SDREPL_HOST", "").strip()
    if not hostport:
        return None
    host, port = parse_host_port(hostport, "SDREPL_HOST")
    token = env.get("SDREPL_TOKEN", "")
    fingerprint = env.get("SDREPL_FINGERPRINT", "")
    if not token:
        raise UsageError("SDREPL_HOST is set but SDREPL_TOKEN is not: set it to the \"key\" of the daemon's "
                         "connection file (or use --connect FILE)")
    if not fingerprint:
        raise UsageError("SDREPL_HOST is set but SDREPL_FINGERPRINT is not: set it to the \"fingerprint\" of the "
                         "daemon's connection file (`sdrepl serve` prints it), so the client knows it talks to "
                         "your daemon (or use --connect FILE)")
    if port == 0:
        raise UsageError("SDREPL_HOST: port 0 is not a daemon's port; give the port `sdrepl serve` printed")
    return RemoteEndpoint(host, port, normal_fingerprint(fingerprint), token, "SDREPL_HOST")
