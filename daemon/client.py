"""The client side of the protocol: what the REPL, ``sdrepl status/stop`` and the tests talk through.

:class:`DaemonClient` is asyncio-based and multiplexes: many requests may be in flight on one connection,
replies are matched to them by id, and events go to listeners. :func:`request_sync` is a blocking
one-shot for commands that ask one thing and exit (``status``, ``stop``, the auto-start probe).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket as socket_mod
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdrepl.core.errors import SdreplError
from sdrepl.daemon import protocol
from sdrepl.daemon.auth import RemoteEndpoint
from sdrepl.daemon.runtime_dir import check_peer, check_socket
from sdrepl.daemon.tls import TlsError
from sdrepl.daemon.transport import open_remote, open_remote_sync

log = logging.getLogger(__name__)
READ_CHUNK = 1 << 18


class RemoteError(SdreplError):
    """An error reply from the daemon; ``type_name`` is the daemon's error type (``PromptError``, ...)."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self._type_name = type_name
        self.message = message

    @property
    def type_name(self) -> str:
        return self._type_name


class DaemonUnavailable(SdreplError):
    """No daemon answers on the socket, or it went away while a request was in flight."""


def _no_daemon(socket: Path | RemoteEndpoint, why: str = "") -> DaemonUnavailable:
    extra = f" ({why})" if why else ""
    if isinstance(socket, RemoteEndpoint):
        return DaemonUnavailable(f"no daemon answers at {socket} ({socket.source}){extra}; start it there with "
                                 "`sdrepl serve --listen HOST:PORT`")
    return DaemonUnavailable(f"no daemon on {socket}{extra}; start one with `sdrepl serve`")


def _error_from_reply(message: dict[str, Any]) -> RemoteError:
    error = message.get("error") or {}
    return RemoteError(str(error.get("type", "InternalError")), str(error.get("message", "no message")))


class DaemonClient:
    """One connection to the daemon. Make it with :meth:`connect`; close it with :meth:`close`."""

    def __init__(self, socket: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.socket = socket
        self.hello: dict[str, Any] = {}
        self.closed = False
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._listeners: list[Callable[[dict], None]] = []
        self._reader_task: asyncio.Task | None = None
        #: Called with the reason once the connection is closed (by either side), e.g. to reconnect.
        self.on_closed: list[Callable[[str], None]] = []
        #: A remote client's own outputs folder: where the pictures sent back are written (set by the REPL).
        self.local_outputs: Path | None = None

    @property
    def remote(self) -> bool:
        """Talking to a daemon on another machine (TLS): pictures come back as bytes, its paths are not ours."""
        return isinstance(self.socket, RemoteEndpoint)

    @classmethod
    async def connect(cls, socket: Path | RemoteEndpoint, *, timeout: float = 5.0, events: bool = True,
                      client: str = "repl") -> DaemonClient:
        """Connect and say hello; :class:`DaemonUnavailable` if nothing answers within ``timeout``.

        ``socket`` is the Unix socket, or a :class:`RemoteEndpoint` (TLS, pinned certificate, key in the hello)."""
        socket = socket if isinstance(socket, RemoteEndpoint) else Path(socket)
        auth: dict[str, Any] = {"token": socket.key} if isinstance(socket, RemoteEndpoint) else {}
        if not isinstance(socket, RemoteEndpoint):
            check_socket(socket)
        try:
            if isinstance(socket, RemoteEndpoint):
                reader, writer = await open_remote(socket, timeout)
            else:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(str(socket), limit=protocol.MAX_LINE), timeout)
        except TlsError as exc:
            raise DaemonUnavailable(str(exc)) from exc
        except ssl.SSLError as exc:
            raise _no_daemon(socket, f"TLS failed: {exc.reason or exc}") from exc
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise _no_daemon(socket) from exc
        except TimeoutError as exc:
            raise _no_daemon(socket, f"no connection within {timeout:g} s") from exc
        except OSError as exc:
            raise _no_daemon(socket, exc.strerror or str(exc)) from exc
        try:
            if not isinstance(socket, RemoteEndpoint):  # a TLS peer is checked by its pinned certificate
                check_peer(writer.get_extra_info("socket"), socket)
        except BaseException:
            writer.close()
            raise
        self = cls(socket, reader, writer)
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())
        try:
            self.hello = await asyncio.wait_for(
                self.request("hello", protocol=protocol.PROTOCOL_VERSION, client=client, events=events, **auth),
                timeout)
        except TimeoutError as exc:
            await self.close()
            raise DaemonUnavailable(f"the daemon on {socket} did not answer hello within {timeout:g} s; it may "
                                    "be stuck: see its log, or `sdrepl stop` it") from exc
        except BaseException:
            await self.close()
            raise
        return self

    def add_event_listener(self, callback: Callable[[dict], None]) -> None:
        """Call ``callback(event)`` on the loop for every event message (a listener's error is logged)."""
        self._listeners.append(callback)

    def start(self, type: str, **params: Any) -> tuple[int, asyncio.Future]:
        """Send a request now; return its id (for :meth:`cancel`) and a future of its result."""
        if self.closed:
            raise DaemonUnavailable(f"the connection to the daemon on {self.socket} is closed")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._writer.write(protocol.encode(protocol.request(request_id, type, **params)))
        except (OSError, RuntimeError) as exc:
            self._pending.pop(request_id, None)
            raise DaemonUnavailable(f"daemon went away ({exc})") from exc
        return request_id, future

    async def request(self, type: str, **params: Any) -> dict[str, Any]:
        """Send a request and wait for its result; :class:`RemoteError` on an error reply."""
        _, future = self.start(type, **params)
        return await future

    async def cancel(self, request_id: int) -> bool:
        """Cancel an in-flight request of this connection; True if the daemon still had it."""
        result = await self.request("cancel", request=request_id)
        return bool(result.get("cancelled"))

    async def close(self) -> None:
        if self._reader_task is not None and not self._reader_task.done():
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        self._mark_closed("the client closed the connection")
        with contextlib.suppress(Exception):
            self._writer.close()
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)

    async def __aenter__(self) -> DaemonClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- reading -----------------------------------------------------------------------------------

    def _mark_closed(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(DaemonUnavailable(f"daemon went away ({why})"))
        for callback in list(self.on_closed):
            try:
                callback(why)
            except Exception:
                log.exception("on_closed callback %r failed", callback)

    async def _read_loop(self) -> None:
        why = "the connection was closed"
        framer = protocol.LineFramer()
        try:
            while True:
                chunk = await self._reader.read(READ_CHUNK)
                if not chunk:
                    break
                for line in framer.feed(chunk):
                    if line is None:
                        log.warning("ignoring a message from the daemon longer than the protocol limit")
                        continue
                    if not line.strip():
                        continue
                    try:
                        message = protocol.decode(line)
                    except protocol.BadRequest:
                        log.warning("ignoring a line from the daemon that is not a JSON object: %.200r", line)
                        continue
                    self._dispatch(message)
        except (ConnectionError, OSError) as exc:
            why = str(exc) or type(exc).__name__
        finally:
            self._mark_closed(why)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if protocol.is_event(message):
            for listener in list(self._listeners):
                try:
                    listener(message)
                except Exception:
                    log.exception("event listener %r failed", listener)
            return
        future = self._pending.pop(message.get("id"), None)  # type: ignore[arg-type]
        if future is None or future.done():
            if message.get("id") is not None:
                log.warning("a reply for unknown request id %r", message.get("id"))
            else:
                log.warning("the daemon rejected a message: %s", (message.get("error") or {}).get("message"))
            return
        if message.get("ok"):
            future.set_result(message.get("result") or {})
        else:
            future.set_exception(_error_from_reply(message))


def _open_sync(socket: Path | RemoteEndpoint, timeout: float) -> Any:
    """A blocking connection to the Unix socket or (TLS, pinned) to a remote endpoint."""
    if isinstance(socket, RemoteEndpoint):
        try:
            return open_remote_sync(socket, timeout)
        except TlsError as exc:
            raise DaemonUnavailable(str(exc)) from exc
        except ssl.SSLError as exc:
            raise _no_daemon(socket, f"TLS failed: {exc.reason or exc}") from exc
        except (ConnectionRefusedError, TimeoutError) as exc:
            raise _no_daemon(socket) from exc
        except OSError as exc:
            raise _no_daemon(socket, exc.strerror or str(exc)) from exc
    check_socket(socket)
    sock = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(socket))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise _no_daemon(socket) from exc
    except OSError as exc:
        sock.close()
        raise _no_daemon(socket, exc.strerror or str(exc)) from exc
    try:
        check_peer(sock, socket)
    except BaseException:
        sock.close()
        raise
    return sock


def request_sync(socket: Path | RemoteEndpoint, type: str, timeout: float = 10.0, **params: Any) -> dict[str, Any]:
    """Connect, say hello (no events), send one request, return its result; blocking.

    :class:`DaemonUnavailable` when nothing answers within ``timeout``; :class:`RemoteError` on an error
    reply. Usable from any thread, including one running an event loop.
    """
    socket = socket if isinstance(socket, RemoteEndpoint) else Path(socket)
    deadline = time.monotonic() + timeout
    auth: dict[str, Any] = {"token": socket.key} if isinstance(socket, RemoteEndpoint) else {}
    sock = _open_sync(socket, timeout)
    try:
        hello = protocol.request(0, "hello", protocol=protocol.PROTOCOL_VERSION, client=f"sync-{os.getpid()}",
                                 events=False, **auth)
        sock.sendall(protocol.encode(hello) + protocol.encode(protocol.request(1, type, **params)))
        framer = protocol.LineFramer()
        lines: list[bytes | None] = []
        while True:
            while not lines:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DaemonUnavailable(f"the daemon on {socket} did not answer {type!r} within {timeout:g} s")
                sock.settimeout(remaining)
                try:
                    chunk = sock.recv(1 << 16)
                except TimeoutError as exc:
                    raise DaemonUnavailable(
                        f"the daemon on {socket} did not answer {type!r} within {timeout:g} s") from exc
                except OSError as exc:
                    raise DaemonUnavailable(f"daemon went away ({exc})") from exc
                if not chunk:
                    raise DaemonUnavailable(f"daemon went away before answering {type!r}")
                lines = framer.feed(chunk)
            line = lines.pop(0)
            if line is None or not line.strip():
                continue
            message = protocol.decode(line)
            if not protocol.is_reply(message):
                continue
            if message.get("id") == 0 and not message.get("ok"):
                raise _error_from_reply(message)
            if message.get("id") == 1:
                if message.get("ok"):
                    return message.get("result") or {}
                raise _error_from_reply(message)
    finally:
        sock.close()
