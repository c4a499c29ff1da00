"""The asyncio Unix-socket server: connections, framing, dispatch, and events fanned out to clients.

Every request becomes its own task, so replies come in any order and a slow generation never holds up a
``tokens`` or ``cancel`` on the same connection. Every request gets exactly one reply: the handler's
result, its :class:`SdreplError` as an error reply, or ``InternalError`` (traceback to the log, never to
the client). A bad line gets an error reply and the connection stays open.

What waits to be written to one client is bounded (a client that sends but never reads must not grow the
daemon without limit): above :data:`PAUSE_READING` bytes the daemon reads no more of that client's lines
until it catches up, above :data:`EVENT_BACKLOG_LIMIT` its events are dropped, and a client that still has
more than :data:`OUTPUT_LIMIT` bytes unread when a reply is due is disconnected (logged, documented in
docs/protocol.md): memory stays within the limit plus one message per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
from pathlib import Path
from typing import Any

from sdrepl.core.errors import SdreplError
from sdrepl.daemon import protocol
from sdrepl.daemon.admission import DEFAULT_MAX_QUEUE, Admission, RateLimit
from sdrepl.daemon.auth import AuthFailed, keys_match
from sdrepl.daemon.context import DaemonContext
from sdrepl.daemon.protocol import BadRequest, Cancelled, InternalError, UnknownRequest
from sdrepl.daemon.registry import Request, known_types, lookup
from sdrepl.daemon.remote_files import refuse_daemon_paths
from sdrepl.daemon.transport import AUTH_TIMEOUT_S, PREAUTH_LINE
from sdrepl.daemon.uploads import forget as forget_uploads

log = logging.getLogger(__name__)

#: Modules whose ``@handler`` registrations make up the protocol.
HANDLER_MODULES = ("sdrepl.daemon.handlers", "sdrepl.daemon.generation", "sdrepl.daemon.training_handlers",
                   "sdrepl.daemon.networks", "sdrepl.daemon.model_handlers", "sdrepl.daemon.remote_files",
                   "sdrepl.daemon.uploads", "sdrepl.daemon.push", "sdrepl.daemon.inspect_handlers",
                   "sdrepl.daemon.mix_handler", "sdrepl.daemon.grid_handler")
#: Above this many bytes waiting to be written to one client, the daemon reads no more of its lines.
PAUSE_READING = 4 * 1024 * 1024
#: Above this many bytes waiting to be written to one client, its events are dropped (replies never are).
EVENT_BACKLOG_LIMIT = 8 * 1024 * 1024
#: A client with more than this many bytes unread when a reply is due is disconnected ("slow reader").
OUTPUT_LIMIT = 32 * 1024 * 1024
READ_CHUNK = 1 << 18


def load_handlers() -> None:
    """Import the handler modules so their ``@handler`` decorators register (an import error is a bug: it
    surfaces at start-up instead of turning requests into ``UnknownRequest``)."""
    for name in HANDLER_MODULES:
        importlib.import_module(name)


class Connection:
    """One client. Its in-flight requests are cancelled when it goes away."""

    def __init__(self, server: DaemonServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 number: int) -> None:
        self.server = server
        self.ctx = server.ctx
        self.reader = reader
        self.writer = writer
        self.number = number
        self.client = "?"
        self.subscribed = False
        self.closed = False
        self.inflight: dict[int | str, tuple[Request, asyncio.Task]] = {}
        self._dropped_events = 0
        #: A TCP client (docs/deployment.md): authenticates in its hello; daemon paths are refused for it.
        self.remote = False
        self.authenticated = True
        self.key: str | None = None
        self.rate = RateLimit()

    # --- sending (loop thread unless said otherwise) ----------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        self.send_bytes(protocol.encode(message), is_event=message.get("type") == "event")

    def send_bytes(self, data: bytes, *, is_event: bool = False) -> None:
        if self.closed or self.writer.is_closing():
            return
        transport = self.writer.transport
        waiting = transport.get_write_buffer_size()
        if is_event and waiting > EVENT_BACKLOG_LIMIT:
            self._dropped_events += 1
            if self._dropped_events == 1:
                log.warning("client %s is not reading; dropping its events", self.label)
            return
        if not is_event and waiting > OUTPUT_LIMIT:
            self.drop(f"it left {waiting} bytes of replies unread (the limit is {OUTPUT_LIMIT})")
            return
        try:
            self.writer.write(data)
        except (ConnectionError, RuntimeError):
            self.closed = True

    def send_event(self, event: str, **fields: Any) -> None:
        """An event for this connection only (thread-safe), if it subscribed to events."""
        message = protocol.event(event, **fields)
        self.ctx.call_soon(lambda: self.subscribed and self.send(message))

    def drop(self, why: str) -> None:
        """Disconnect a client that does not read, discarding what waits for it (the documented close)."""
        log.warning("disconnecting client %s: %s", self.label, why)
        self.closed = True
        self.writer.transport.abort()

    async def _catch_up(self) -> None:
        """While this client has more than PAUSE_READING bytes unread, read none of its lines."""
        transport = self.writer.transport
        while not self.closed and transport.get_write_buffer_size() > PAUSE_READING:
            try:
                await asyncio.wait_for(self.writer.drain(), 1.0)
            except TimeoutError:
                continue

    @property
    def label(self) -> str:
        return f"#{self.number} ({self.client})"

    # --- cancelling ----------------------------------------------------------------------------------

    def cancel_request(self, request_id: int | str) -> bool:
        """Tell an in-flight request to stop; queued device work is dropped at once. True if it was found."""
        entry = self.inflight.get(request_id)
        if entry is None or entry[1].done():
            return False
        req, _ = entry
        req.cancel_event.set()
        self.ctx.worker.discard(req.cancel_event)
        return True

    def cancel_all(self, *, abandon: bool) -> None:
        """Cancel every in-flight request; ``abandon`` (the client is gone) also stops waiting for replies."""
        for request_id, (_, task) in list(self.inflight.items()):
            self.cancel_request(request_id)
            if abandon:
                task.cancel()

    # --- reading -------------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Read lines until the client goes away (lines over the limit are refused and skipped)."""
        framer = protocol.LineFramer(PREAUTH_LINE if not self.authenticated else protocol.MAX_LINE)
        self.writer.transport.set_write_buffer_limits(high=PAUSE_READING)  # what drain() waits for
        deadline = asyncio.get_running_loop().time() + AUTH_TIMEOUT_S
        try:
            while not self.closed:
                if self.authenticated:
                    framer.limit = protocol.MAX_LINE
                    chunk = await self.reader.read(READ_CHUNK)
                else:  # an unauthenticated client gets AUTH_TIMEOUT_S for its hello, then is dropped
                    try:
                        chunk = await asyncio.wait_for(self.reader.read(READ_CHUNK),
                                                       max(0.0, deadline - asyncio.get_running_loop().time()))
                    except TimeoutError:
                        log.warning("client %s sent no valid hello within %.0f s; closing", self.label,
                                    AUTH_TIMEOUT_S)
                        break
                if not chunk:
                    break
                for line in framer.feed(chunk):
                    if line is None:
                        self._overlong()
                        if not self.authenticated:
                            self._authenticate(None, None, None)
                    else:
                        self.on_line(line)
                    await self._catch_up()
        except (ConnectionError, OSError) as exc:
            log.debug("connection %s: %s", self.label, exc)
        finally:
            self.closed = True
            self.cancel_all(abandon=True)
            forget_uploads(id(self))
            with contextlib.suppress(Exception):
                self.writer.close()

    def _overlong(self) -> None:
        self.send(protocol.reply_error(None, "BadRequest", f"a line is longer than the protocol's "
                                       f"{protocol.MAX_LINE} bytes (newline included); it was skipped"))

    def on_line(self, line: bytes) -> None:
        """Dispatch one line; whatever goes wrong, the line gets a reply (``InternalError`` for a bug)."""
        try:
            self._dispatch(line)
            if not self.authenticated and not self.closed:  # a bad line before the hello: refused too
                self._authenticate(None, None, None)
        except Exception as exc:
            log.exception("a line from client %s could not be dispatched", self.label)
            self.send(protocol.reply_exception(None, InternalError(
                f"internal error while reading a request ({type(exc).__name__}); the traceback is in "
                f"{self.ctx.log_hint}")))

    def _dispatch(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            message = protocol.decode(line)
        except BadRequest as exc:
            self.send(protocol.reply_exception(None, exc))
            return
        request_id = message.get("id")
        if not protocol.valid_id(request_id):
            what = "has no \"id\"" if "id" not in message else f"has an id of the wrong kind ({request_id!r})"
            self.send(protocol.reply_error(None, "BadRequest", f"a request {what}; give each request an integer "
                                           "or string id (replies carry it back)"))
            return
        if isinstance(request_id, str) and protocol.lone_surrogate(request_id) is not None:
            self.send(protocol.reply_error(None, "BadRequest", f"a request id holds a lone surrogate "
                                           f"({request_id!a}); ids are Unicode text: send UTF-8"))
            return
        type_name = message.get("type")
        token = message.pop("token", None)  # only the hello's authentication reads it; never a parameter
        if not self.authenticated and not self._authenticate(request_id, type_name, token):
            return
        if not isinstance(type_name, str) or not type_name:
            self.send(protocol.reply_error(request_id, "BadRequest", "a request needs a \"type\" (a string), e.g. "
                                           "\"ping\""))
            return
        spec = lookup(type_name)
        if spec is None:
            self.send(protocol.reply_exception(request_id, UnknownRequest(
                f"unknown request type {type_name!r}; known types: {', '.join(known_types())}")))
            return
        if request_id in self.inflight:
            self.send(protocol.reply_error(request_id, "BadRequest", f"request id {request_id!r} is already in use "
                                           "by a request in flight on this connection; use a new id"))
            return
        params = {k: v for k, v in message.items() if k not in ("id", "type")}
        try:
            if self.remote:
                self.rate.take()
                refuse_daemon_paths(type_name, params, id(self))
            admitted = self.server.admission.enter(type_name)  # QueueFull at once; nothing queued
        except SdreplError as exc:
            self.send(protocol.reply_exception(request_id, exc))
            return
        req = Request(request_id, type_name, self)
        task = asyncio.get_running_loop().create_task(self._run(spec.fn, params, req, admitted))
        self.inflight[request_id] = (req, task)

    def _authenticate(self, request_id: int | str, type_name: Any, token: Any) -> bool:
        """A TCP client's first request must be a hello with the daemon's key; anything else closes it."""
        if type_name == "hello" and self.key is not None and keys_match(token, self.key):
            self.authenticated = True
            log.info("client %s authenticated", self.label)
            return True
        why = ("the first request must be a hello carrying the connection file's key" if type_name != "hello" else
               "no key" if token is None else "a wrong key")
        log.warning("refusing client %s: %s", self.label, why)
        self.send(protocol.reply_exception(request_id, AuthFailed(
            f"not authenticated ({why}); connect with `sdrepl --connect FILE` using the daemon's connection file, "
            "or set SDREPL_TOKEN to its key")))
        self.closed = True
        with contextlib.suppress(Exception):
            self.writer.close()  # after the reply is flushed
        return False

    async def _run(self, fn: Any, params: dict[str, Any], req: Request, admitted: bool = False) -> None:
        reply: dict[str, Any] | None = None
        try:
            if self.server.stopping and req.type not in ("status", "ping", "hello", "cancel", "shutdown"):
                raise protocol.Busy("the daemon is shutting down and takes no new requests")
            result = await fn(self.ctx, params, req)
            if not isinstance(result, dict):
                raise TypeError(f"handler for {req.type!r} returned {type(result).__name__}, not a dict")
            reply = protocol.reply_ok(req.id, result)
        except SdreplError as exc:
            reply = protocol.reply_exception(req.id, exc)
        except asyncio.CancelledError:
            if not self.closed:  # shutdown: still answer
                reply = protocol.reply_exception(req.id, Cancelled("the daemon is shutting down"))
        except Exception as exc:
            log.exception("request %s %r of client %s failed", req.type, req.id, self.label)
            reply = protocol.reply_exception(req.id, InternalError(
                f"{req.type}: internal error ({type(exc).__name__}: {str(exc)[:200]}); the traceback is in "
                f"{self.ctx.log_hint}"))
        finally:
            self.inflight.pop(req.id, None)
            if admitted:
                self.server.admission.leave()
        if reply is not None:
            self.send(reply)


class DaemonServer:
    """Listens on the socket and owns the connections."""

    def __init__(self, ctx: DaemonContext) -> None:
        self.ctx = ctx
        self.connections: set[Connection] = set()
        self.stopping = False
        self.stopped = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._tcp_servers: list[asyncio.AbstractServer] = []
        self.admission = Admission(getattr(ctx.settings, "max_queue", DEFAULT_MAX_QUEUE))
        self._key: str | None = None
        self._numbers = 0
        self._shutdown_reason: str | None = None
        self._conn_tasks: set[asyncio.Task] = set()

    async def listen(self, socket: Path) -> None:
        """Bind the socket owner-only (umask while binding, so there is no window) and start accepting."""
        socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._accept, path=str(socket),
                                                           limit=protocol.MAX_LINE)
        finally:
            os.umask(old_umask)
        os.chmod(socket, 0o600)
        self.ctx.bind(broadcast=self.broadcast, request_shutdown=self.request_shutdown,
                      client_count=lambda: len(self.connections))

    async def listen_tcp(self, host: str, port: int, ssl_context: Any, key: str) -> tuple[str, int]:
        """A TLS listener whose clients must authenticate with ``key``; returns the bound (host, port)."""
        self._key = key
        server = await asyncio.start_server(self._accept_remote, host=host, port=port, ssl=ssl_context,
                                            ssl_handshake_timeout=AUTH_TIMEOUT_S, limit=protocol.MAX_LINE,
                                            reuse_address=True)
        self._tcp_servers.append(server)
        bound = server.sockets[0].getsockname()
        return host, int(bound[1])

    async def _accept_remote(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._accept(reader, writer, remote=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                      remote: bool = False) -> None:
        self._numbers += 1
        conn = Connection(self, reader, writer, self._numbers)
        if remote:
            peer = writer.get_extra_info("peername")
            conn.client = f"remote {peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "remote"
            conn.remote, conn.authenticated, conn.key = True, False, self._key
        if self.stopping:
            writer.close()
            return
        self.connections.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self._conn_tasks.add(task)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)
            if task is not None:
                self._conn_tasks.discard(task)

    def broadcast(self, message: dict[str, Any]) -> None:
        """Send an event to every subscribed connection (loop thread; use ``ctx.broadcast`` elsewhere)."""
        data = protocol.encode(message)
        for conn in list(self.connections):
            if conn.subscribed:
                conn.send_bytes(data, is_event=True)

    def request_shutdown(self, reason: str) -> None:
        if self._shutdown_reason is None:
            self._shutdown_reason = reason
            log.info("shutting down: %s", reason)
            self.stopping = True
            self.stopped.set()

    @property
    def shutdown_reason(self) -> str | None:
        return self._shutdown_reason

    def stop_accepting(self) -> None:
        for server in [self._server, *self._tcp_servers]:
            if server is not None:
                server.close()

    async def drain_requests(self, grace: float) -> None:
        """Let in-flight requests finish for ``grace`` seconds, then cancel them (they reply Cancelled)."""
        tasks = [task for conn in self.connections for _, task in conn.inflight.values()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            if pending:
                for conn in list(self.connections):
                    conn.cancel_all(abandon=False)
                _, pending = await asyncio.wait(pending, timeout=max(grace, 2.0))
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=1.0)

    async def close_connections(self) -> None:
        for conn in list(self.connections):
            with contextlib.suppress(Exception):
                if conn.writer.can_write_eof():
                    conn.writer.write_eof()
            conn.writer.close()
        for conn in list(self.connections):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.writer.wait_closed(), 1.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
