"""A daemon connection that survives the daemon: lost at once, found again, restarted on demand.

The REPL holds one :class:`Connection` for its whole life instead of one ``DaemonClient``. It speaks the
client API the session, the toolbar and the state feed use (``hello``, ``start``, ``request``, ``cancel``,
``add_event_listener``), forwarding to the current ``DaemonClient``, so none of them knows about
reconnecting. What it adds:

- the moment a connection closes (daemon stopped, crashed, killed), ``on_lost(reason)`` is called, so the
  REPL says so at once, not on the next line;
- :meth:`watch` (a background task of the interactive REPL) connects again as soon as a daemon answers on
  the socket; ``on_back(client)`` is called, so the REPL re-reads embeddings, model and training job;
- :meth:`ensure` (before each line) reconnects, and with ``auto_start`` starts a daemon with the REPL's own
  settings (as at start-up) when none answers, saying so through ``on_status``;
- a request made while no daemon is connected fails at once with :class:`DaemonUnavailable` saying what to
  do; event listeners are kept and attached to each new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sdrepl.daemon.client import DaemonClient, DaemonUnavailable

log = logging.getLogger("sdrepl.repl")

#: What to do when the daemon went away (the REPL and scripted sessions say it alike).
NEXT_LINE_HINT = "the next line reconnects, starting a daemon if none answers"
#: How often :meth:`Connection.watch` looks for a daemon on the socket while none is connected.
WATCH_INTERVAL_S = 0.5


class Connection:
    """One REPL's link to the daemon on ``settings.socket`` (see the module docstring)."""

    def __init__(self, settings: Any, *, client_name: str = "repl",
                 connect: Callable[..., Awaitable[Any]] | None = None,
                 start_daemon: Callable[[Any, Callable[[str], None]], None] | None = None) -> None:
        self.settings = settings
        self.client_name = client_name
        self.client: Any = None
        self.on_lost: list[Callable[[str], None]] = []
        self.on_back: list[Callable[[Any], Any]] = []
        self.on_status: Callable[[str], None] = lambda text: None
        self._connect = connect or self._connect_socket
        self._start_daemon = start_daemon or _start_daemon
        self._listeners: list[Callable[[dict], None]] = []
        self._lock = asyncio.Lock()
        self._lost_reason: str | None = None

    # -- the client API, forwarded ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.client is not None and not self.client.closed

    @property
    def hello(self) -> dict[str, Any]:
        return getattr(self.client, "hello", None) or {}

    @property
    def socket(self) -> Any:
        return self.settings.target

    @property
    def remote(self) -> bool:
        """Whether the daemon is on another machine (``DaemonClient.remote``)."""
        return bool(getattr(self.client, "remote", False))

    @property
    def local_outputs(self) -> Any:
        """A remote daemon's pictures land here (``DaemonClient.local_outputs``; None for a local daemon)."""
        return getattr(self.client, "local_outputs", None)

    def add_event_listener(self, callback: Callable[[dict], None]) -> None:
        self._listeners.append(callback)
        if self.client is not None:
            self.client.add_event_listener(callback)

    def remove_event_listener(self, callback: Callable[[dict], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)
        listeners = getattr(self.client, "_listeners", None)
        if isinstance(listeners, list):
            with contextlib.suppress(ValueError):
                listeners.remove(callback)

    def start(self, type: str, **params: Any) -> tuple[int, asyncio.Future]:
        """As ``DaemonClient.start``; a daemon lost mid-request fails the future with what to do next."""
        if not self.connected:
            raise self.gone()
        request_id, inner = self.client.start(type, **params)
        outer = asyncio.get_running_loop().create_future()

        def settle(done: asyncio.Future) -> None:
            # Retrieve the inner outcome even when nobody waits any more (the line was cancelled with
            # Ctrl-C before the daemon's Cancelled reply came): an unretrieved exception reaches the event
            # loop's handler, and prompt_toolkit then shows "Press ENTER to continue" and eats what is typed.
            error = None if done.cancelled() else done.exception()
            if outer.done():
                return
            if done.cancelled():
                outer.cancel()
            elif isinstance(error, DaemonUnavailable):
                outer.set_exception(DaemonUnavailable(f"{error}; {NEXT_LINE_HINT} (the daemon's log: "
                                                      f"{self.settings.log_file})"))
            elif error is not None:
                outer.set_exception(error)
            else:
                outer.set_result(done.result())

        inner.add_done_callback(settle)
        return request_id, outer

    async def request(self, type: str, **params: Any) -> dict[str, Any]:
        _, future = self.start(type, **params)
        return await future

    async def cancel(self, request_id: int) -> bool:
        if not self.connected:
            return False
        return await self.client.cancel(request_id)

    def gone(self) -> DaemonUnavailable:
        why = f" ({self._lost_reason})" if self._lost_reason else ""
        return DaemonUnavailable(f"no daemon is connected on {self.settings.target}{why}; {NEXT_LINE_HINT}")

    # -- connecting ---------------------------------------------------------------------------------

    async def _connect_socket(self) -> Any:
        return await DaemonClient.connect(self.settings.target, timeout=5.0, events=True, client=self.client_name)

    async def attach(self, client: Any) -> None:
        """Use ``client`` from now on: hook its close, attach the listeners, tell ``on_back``."""
        self.client = client
        self._lost_reason = None
        hooks = getattr(client, "on_closed", None)
        if isinstance(hooks, list):
            hooks.append(lambda why, client=client: self._closed(client, why))
        for listener in self._listeners:
            client.add_event_listener(listener)
        for callback in list(self.on_back):
            try:
                outcome = callback(client)
                if asyncio.iscoroutine(outcome):
                    await outcome
            except Exception:
                log.exception("reconnect callback failed")

    def _closed(self, client: Any, why: str) -> None:
        if client is not self.client or why == "the client closed the connection":
            return
        self._lost_reason = why
        log.warning("the daemon connection was lost: %s", why)
        for callback in list(self.on_lost):
            try:
                callback(why)
            except Exception:
                log.exception("connection-lost callback failed")

    async def ensure(self, *, auto_start: bool = True) -> bool:
        """Connected when this returns True; reconnects (and with ``auto_start`` starts a daemon) if needed.

        False when nothing answers and no daemon was to be started; :class:`DaemonUnavailable` (the
        daemon's own error, e.g. a bad ``--model``) when starting one failed.
        """
        if self.connected:
            return True
        async with self._lock:
            if self.connected:
                return True
            try:
                await self.attach(await self._connect())
                return True
            except DaemonUnavailable:
                if not auto_start:
                    return False
            await asyncio.to_thread(self._start_daemon, self.settings, self.on_status)
            await self.attach(await self._connect())
            return True

    async def watch(self) -> None:
        """Reconnect in the background whenever a daemon answers again (runs until cancelled)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if self.connected:
                continue
            try:
                await self.ensure(auto_start=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a daemon half up (e.g. still loading): try again later
                log.debug("reconnect attempt failed: %s", exc)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


def _start_daemon(settings: Any, on_status: Callable[[str], None]) -> None:
    from sdrepl.daemon.lifecycle import ensure_daemon

    ensure_daemon(settings, on_status=on_status, timeout=300)
