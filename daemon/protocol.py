"""The wire format of the daemon protocol (``docs/protocol.md``): framing, message shapes, error types.

One JSON object per ``\\n``-terminated UTF-8 line, at most :data:`MAX_LINE` bytes. Both ends (server and
client) build, frame and parse messages only through this module, so the document and the code have one
place to agree. Nothing here does I/O.

File names need not be UTF-8. Python reads a byte that is not as a lone surrogate (U+DC80 + byte, PEP
383's surrogateescape), which UTF-8 cannot carry; :func:`encode` then sends the whole message
ASCII-escaped, so the byte travels as the JSON escape ``\\udcff`` and ``os.fsencode`` on the client gives the
file's real name back. Requests are Unicode text: :func:`lone_surrogate` finds what a request may not hold.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sdrepl.core import json_text
from sdrepl.core.errors import Cancelled as Cancelled  # re-exported: core work raises it too
from sdrepl.core.errors import SdreplError

#: The protocol's number; bump it for a change an old client cannot ignore (see docs/protocol.md).
PROTOCOL_VERSION = 2
#: The oldest version whose clients this daemon still serves (every version-1 request form still works).
OLDEST_PROTOCOL = 1
#: Longest accepted line, newline included (a generous cap so a runaway client cannot eat the memory).
MAX_LINE = 16 * 1024 * 1024


class BadRequest(SdreplError):
    """A message that is not a valid request: not JSON, not an object, no id, or a bad parameter."""


class UnknownRequest(SdreplError):
    """A request ``type`` the daemon does not know (the message lists the ones it does)."""


class ProtocolMismatch(SdreplError):
    """The client speaks another protocol version than the daemon."""


class Busy(SdreplError):
    """The daemon cannot take this request now (e.g. it is shutting down)."""


class InternalError(SdreplError):
    """A bug in the daemon; the message says where the traceback was logged."""


_SURROGATE = re.compile("[\ud800-\udfff]")


def encode(message: dict[str, Any]) -> bytes:
    """One message as a protocol line. Non-JSON values (paths, numpy numbers) are sent as strings.

    A message holding a lone surrogate (a file-name byte that is not UTF-8) goes out ASCII-escaped, the
    surrogate as ``\\udcXX``: still one valid JSON line, and the name survives the round trip. A non-finite
    number (a diverged loss) goes out as ``null`` (``core.json_text``): ``NaN`` is not JSON.
    """
    text = json_text.dumps(message, ensure_ascii=False, separators=(",", ":"), default=str)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json_text.dumps(message, ensure_ascii=True, separators=(",", ":"), default=str) + "\n").encode("ascii")


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate in ``text`` (a ``\\udXXX`` escape that is no pair), else None."""
    match = _SURROGATE.search(text)
    return None if match is None else match.start()


def decode(line: bytes | str) -> dict[str, Any]:
    """Parse one line (with or without its newline) into a message object, or raise :class:`BadRequest`."""
    try:
        text = line.decode("utf-8") if isinstance(line, bytes) else line
        message = json.loads(text)
    except UnicodeDecodeError as exc:
        raise BadRequest(f"a line is not UTF-8 ({exc.reason} at byte {exc.start}); send UTF-8 JSON") from exc
    except ValueError as exc:
        raise BadRequest(f"a line is not JSON ({exc}); send one JSON object per line") from exc
    except RecursionError as exc:  # e.g. 100,000 "[": the parser's own recursion limit
        raise BadRequest("a line nests arrays or objects too deeply to parse; a request is one flat object "
                         "of parameters") from exc
    if not isinstance(message, dict):
        raise BadRequest(f"a line is JSON but a {type(message).__name__}, not an object; send {{\"id\": ..., "
                         "\"type\": ...}")
    return message


def valid_id(value: Any) -> bool:
    """Request ids are ints or strings (bool is not an int here: ``true`` is not an id)."""
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def request(request_id: int | str, type_name: str, **params: Any) -> dict[str, Any]:
    return {"id": request_id, "type": type_name, **params}


def reply_ok(request_id: int | str | None, result: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "type": "reply", "ok": True, "result": result}


def reply_error(request_id: int | str | None, error_type: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "type": "reply", "ok": False, "error": {"type": error_type, "message": message}}


def reply_exception(request_id: int | str | None, exc: SdreplError) -> dict[str, Any]:
    return reply_error(request_id, exc.type_name, str(exc))


def event(name: str, **fields: Any) -> dict[str, Any]:
    return {"type": "event", "event": name, **fields}


def is_reply(message: dict[str, Any]) -> bool:
    return message.get("type") == "reply"


def is_event(message: dict[str, Any]) -> bool:
    return message.get("type") == "event"


class LineFramer:
    """Cuts a byte stream into protocol lines (newline removed), whatever the chunks it arrives in.

    The one framer of both ends. A line longer than ``limit`` bytes (newline included) is never
    buffered whole: :meth:`feed` yields ``None`` for it once and skips the rest of it.
    """

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes | None]:
        """The lines completed by ``data``, in order; ``None`` stands for a skipped overlong line."""
        out: list[bytes | None] = []
        searched = len(self._buffer)  # what was already buffered holds no newline
        self._buffer += data
        end = self._buffer.find(b"\n", searched)
        while end >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._discarding:
                self._discarding = False
            elif end >= self.limit:
                out.append(None)
            else:
                out.append(line)
            end = self._buffer.find(b"\n")
        if len(self._buffer) >= self.limit:
            if not self._discarding:
                out.append(None)
            self._buffer.clear()
            self._discarding = True
        return out
