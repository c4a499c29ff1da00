"""TLS for the daemon's TCP listeners: a self-signed certificate, its fingerprint, and both ends' contexts.

The daemon's certificate is self-signed (there is no CA between a laptop and its GPU box), so clients do
not verify a chain: they *pin* the certificate's SHA-256 fingerprint, which the connection file carries
(jupyter's and ssh's model). The certificate is made once with the ``cryptography`` package and kept
owner-only in the runtime folder, so its fingerprint, and the clients' pins, survive restarts.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import os
import socket
import ssl
import tempfile
from pathlib import Path

from sdrepl.core.errors import SdreplError


class TlsError(SdreplError):
    """A certificate that cannot be made, read or trusted (a wrong fingerprint: the daemon is not the one pinned)."""


def fingerprint_of(der: bytes) -> str:
    """``sha256:<hex>`` of a certificate in DER form (what connection files and known hosts store)."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def normal_fingerprint(text: str) -> str:
    """A fingerprint as given (``sha256:AB:CD...``, plain hex, any case) in the form :func:`fingerprint_of` makes."""
    value = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise TlsError(f"{text!r} is not a SHA-256 certificate fingerprint (64 hex digits, e.g. as `sdrepl serve` "
                       "writes it into the connection file)")
    return "sha256:" + value


def write_private(path: Path, data: bytes) -> None:
    """Write an owner-only file (0600 from its first byte) atomically: a temporary beside it, fsync, rename.
    (``core.atomic.atomic_writer`` gives its result the umask's mode, which is wrong for a key or a secret.)"""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.sdrepl-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def make_self_signed(cert: Path, key: Path, hosts: list[str]) -> None:
    """A new P-256 key and a self-signed certificate (10 years; the hosts as subject alternative names)."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError as exc:  # a dependency; only a broken install lacks it
        raise TlsError("the 'cryptography' package is missing, so no certificate can be made; reinstall sdrepl, or "
                       "give --tls-cert and --tls-key") from exc
    import ipaddress

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"sdrepl daemon on {socket.gethostname()}"[:64])])
    alt: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(private.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=3650))
                   .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                   .sign(private, hashes.SHA256()))
    write_private(key, private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    write_private(cert, certificate.public_bytes(serialization.Encoding.PEM))


def ensure_certificate(cert: Path, key: Path, hosts: list[str]) -> None:
    """Make the default certificate on first start (kept, so the pinned fingerprint stays the same)."""
    if not (cert.is_file() and key.is_file()):
        make_self_signed(cert, key, hosts)


def server_context(cert: Path, key: Path) -> tuple[ssl.SSLContext, str]:
    """The listeners' TLS context (TLS 1.2 at least) and the certificate's fingerprint."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot use the certificate {cert} with the key {key}: {exc}; give a PEM certificate and its "
                       "key (--tls-cert, --tls-key), or leave both out for a self-signed one") from exc
    try:
        der = ssl.PEM_cert_to_DER_cert(cert.read_text(encoding="ascii", errors="replace"))
    except (OSError, ValueError) as exc:
        raise TlsError(f"cannot read the certificate {cert}: {exc}") from exc
    return ctx, fingerprint_of(der)


def client_context() -> ssl.SSLContext:
    """A client context that checks no chain or host name: the peer is trusted by its pinned fingerprint
    (:func:`check_pin`, right after the handshake and before a byte of the protocol is sent)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check_pin(der: bytes | None, pinned: str, where: str) -> str:
    """The peer's fingerprint; :class:`TlsError` unless it is the pinned one."""
    if der is None:
        raise TlsError(f"{where} sent no certificate; it is not an sdrepl daemon")
    actual = fingerprint_of(der)
    if not hmac.compare_digest(actual, normal_fingerprint(pinned)):
        raise TlsError(f"{where} presented certificate {actual}, not the pinned {pinned}: this is not the daemon the "
                       "connection file names (or its certificate changed); refusing to send the secret. Get a new "
                       "connection file from the daemon's machine if it was replaced on purpose")
    return actual
