"""The dispatch table: request type -> handler, plus what a handler gets to know about its request.

Handlers live in several modules (``handlers.py``, ``generation.py``, the training handlers) and register
themselves with ``@handler("type")``; the server looks the type up here and always replies, whatever the
handler does. A handler is ``async def fn(ctx, params, req) -> dict``: it unpacks ``params`` (see
``params.py``), does or queues the work and returns the ``result`` object. It raises an
:class:`~sdrepl.core.errors.SdreplError` to reply with an error; anything else is a bug and is logged.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sdrepl.daemon.context import DaemonContext


class EventSink(Protocol):
    """What a request needs from its connection: a thread-safe way to send it an event."""

    def send_event(self, event: str, **fields: Any) -> None: ...


@dataclass
class Request:
    """One request in flight. ``cancel_event`` is set by ``cancel``, a disconnect or shutdown."""

    id: int | str
    type: str
    connection: EventSink
    cancel_event: threading.Event = field(default_factory=threading.Event)

    def send_event(self, event: str, **fields: Any) -> None:
        """Send an event to this request's connection only (thread-safe; e.g. ``progress``)."""
        self.connection.send_event(event, **fields)

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


HandlerFn = Callable[["DaemonContext", dict, Request], Awaitable[dict]]


@dataclass(frozen=True)
class HandlerSpec:
    fn: HandlerFn


HANDLERS: dict[str, HandlerSpec] = {}


def handler(type_name: str) -> Callable[[HandlerFn], HandlerFn]:
    """Register ``async def fn(ctx, params, req) -> dict`` for requests of ``type_name``.

    Registering a type twice is a programming error (two modules claiming one request) and raises.
    """

    def register(fn: HandlerFn) -> HandlerFn:
        existing = HANDLERS.get(type_name)
        same = existing is not None and (existing.fn.__module__, existing.fn.__qualname__) == (
            fn.__module__, fn.__qualname__)  # the same function, its module imported again
        if existing is not None and not same:
            raise RuntimeError(f"request type {type_name!r} is registered twice: {existing.fn.__module__} "
                               f"and {fn.__module__}")
        HANDLERS[type_name] = HandlerSpec(fn)
        return fn

    return register


def lookup(type_name: str) -> HandlerSpec | None:
    return HANDLERS.get(type_name)


def known_types() -> list[str]:
    return sorted(HANDLERS)
