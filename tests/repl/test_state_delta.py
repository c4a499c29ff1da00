"""The REPL applies an ``embeddings`` event's delta (protocol 2) instead of fetching the whole list again,
and fetches only when it cannot (a version skipped, a change too big to carry, an old daemon)."""

from __future__ import annotations

import asyncio

from sdrepl.repl.state import ReplState, StateFeed

CAT = {"name": "cat", "qualified": "cat", "vectors": 1, "path": "/e/cat.pt", "hash": "aaa"}
DOG = {"name": "dog", "qualified": "dog", "vectors": 2, "path": "/e/dog.pt", "hash": "bbb"}
CAT2 = {"name": "cat", "qualified": "sub/cat", "vectors": 3, "path": "/e/sub/cat.pt", "hash": "ccc"}


def event(version: int, *, added=(), updated=(), removed=(), removed_paths=(), entries=True, skipped=(),
          unskipped=()) -> dict:
    message = {"type": "event", "event": "embeddings", "version": version,
               "change": {"added": [e["qualified"] for e in added], "updated": [e["qualified"] for e in updated],
                          "removed": list(removed), "skipped": list(skipped), "unskipped": list(unskipped),
                          "warnings": []}}
    if entries:
        message["embeddings"] = [*added, *updated]
        message["removed_paths"] = list(removed_paths)
    return message


def state_at(version: int, embeddings: list[dict]) -> ReplState:
    state = ReplState()
    state.set_embeddings({"embeddings": embeddings, "skipped": [], "version": version})
    return state


def test_next_version_is_applied_as_it_is() -> None:
    state = state_at(3, [CAT])
    state.apply_event(event(4, added=[DOG, CAT2]))
    assert state.embeddings == [CAT, CAT2, DOG] and state.library_version == 4 and not state.library_stale
    state.apply_event(event(5, removed=["cat"], removed_paths=["/e/cat.pt"]))
    assert state.embeddings == [CAT2, DOG]  # by file: the other "cat" stays
    state.apply_event(event(6, updated=[{**DOG, "vectors": 5}]))
    assert state.find_embedding("dog")["vectors"] == 5 and len(state.embeddings) == 2


def test_skips_follow_the_delta() -> None:
    state = state_at(1, [])
    state.apply_event(event(2, skipped=[{"path": "/e/bad.pt", "reason": "cut short"}]))
    assert state.skipped == [{"path": "/e/bad.pt", "reason": "cut short"}]
    state.apply_event(event(3, unskipped=["/e/bad.pt"]))
    assert state.skipped == []


def test_a_skipped_version_or_a_change_without_entries_asks_for_the_list() -> None:
    state = state_at(3, [CAT])
    state.apply_event(event(5, added=[DOG]))  # 4 never came
    assert state.library_stale and "dog" in state.embedding_names()
    state = state_at(3, [CAT])
    state.apply_event(event(4, added=[DOG], entries=False))  # too big to carry, or an old daemon
    assert state.library_stale


def test_an_event_already_in_the_list_changes_nothing() -> None:
    state = state_at(7, [CAT])
    state.apply_event(event(6, added=[DOG]))
    assert state.embeddings == [CAT] and not state.library_stale


class CountingClient:
    def __init__(self) -> None:
        self.requests: list[str] = []
        self.listeners = []
        self.hello = {}

    def add_event_listener(self, callback) -> None:
        self.listeners.append(callback)

    async def request(self, type: str, **params):
        self.requests.append(type)
        if type == "embeddings":
            return {"embeddings": [CAT, DOG] if self.requests.count("embeddings") > 1 else [CAT], "skipped": [],
                    "version": 1}
        if type in ("loras", "hypernetworks"):
            return {type: [], "version": 1}
        return {"state": "ready", "model": None, "queue": {"pending": 0, "running": None}}


def test_the_feed_fetches_only_when_a_delta_cannot_be_applied() -> None:
    async def scenario() -> None:
        client = CountingClient()
        state = ReplState()
        await StateFeed(client, state).start()
        assert client.requests.count("embeddings") == 1
        for listener in client.listeners:
            listener(event(2, added=[DOG]))
        await asyncio.sleep(0.01)
        assert client.requests.count("embeddings") == 1 and state.embedding_names() == ["cat", "dog"]
        for listener in client.listeners:
            listener(event(9, added=[CAT2]))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if client.requests.count("embeddings") == 2 and not state.library_stale:
                break
        assert client.requests.count("embeddings") == 2 and not state.library_stale

    asyncio.run(scenario())
