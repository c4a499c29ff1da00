"""A line cancelled with Ctrl-C before the daemon's ``Cancelled`` reply arrives: the late error reply is
consumed, never left for the event loop's handler (prompt_toolkit would show "Unhandled exception in event
loop ... Press ENTER to continue" and swallow the next keys typed)."""

from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace

from sdrepl.core.errors import Cancelled
from sdrepl.repl.connection import Connection


class _Client:
    closed = False

    def __init__(self) -> None:
        self.inner: asyncio.Future | None = None

    def start(self, type: str, **params):
        self.inner = asyncio.get_running_loop().create_future()
        return 7, self.inner


def test_a_late_error_reply_after_the_wait_was_cancelled_is_not_left_unretrieved():
    unhandled: list[dict] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: unhandled.append(context))
        connection = Connection(SimpleNamespace(target="sock", log_file="log"))
        client = _Client()
        connection.client = client
        _, outer = connection.start("generate", prompt="a dog")
        waiter = asyncio.ensure_future(outer)
        await asyncio.sleep(0)
        waiter.cancel()  # Ctrl-C: the line stops waiting
        await asyncio.gather(waiter, return_exceptions=True)
        client.inner.set_exception(Cancelled("generate: cancelled at step 2 of 1000"))  # the late reply
        await asyncio.sleep(0)
        client.inner = None
        del outer, waiter
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert unhandled == []
