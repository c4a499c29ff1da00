"""Typed access to a request's parameters, so every handler rejects bad input the same way.

A handler reads each parameter once through :class:`Params` (``p.integer("steps", 20, lo=1, hi=1000)``) and
ends with :meth:`Params.finish`, which rejects parameters nobody read: a typo such as ``stpes`` is an error
naming the parameter, never silently ignored (the lesson of options popped from ``**kwargs``).
Every failure is a :class:`BadRequest` that names the request, the parameter, what came and what is
expected. ``null`` for a parameter that has a default means that default (clients need not drop keys).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sdrepl.daemon import protocol
from sdrepl.daemon.protocol import BadRequest

_MISSING = object()


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


class Params:
    """The parameters of one request (everything but ``id`` and ``type``)."""

    def __init__(self, params: dict[str, Any], request_type: str) -> None:
        self._params = params
        self._type = request_type
        self._read: set[str] = set()

    def _fail(self, name: str, value: Any, expected: str) -> BadRequest:
        return BadRequest(f"{self._type}: parameter {name!r} must be {expected}, got {_kind(value)} "
                          f"({value!r})"[:500])

    def _get(self, name: str, default: Any) -> Any:
        self._read.add(name)
        value = self._params.get(name, _MISSING)
        if value is _MISSING or (value is None and default is not _MISSING):  # null: "the default"
            if default is _MISSING:
                raise BadRequest(f"{self._type}: missing parameter {name!r}")
            return default
        return value

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        """The value as sent (for parameters a handler checks itself)."""
        return self._get(name, default)

    def text(self, name: str, default: Any = _MISSING, *, choices: Sequence[str] | None = None,
             file_name: bool = False) -> str:
        """A string. It must be Unicode text, except that ``file_name`` (a parameter naming an embedding or
        a file) may carry a file name's non-UTF-8 bytes as ``\\udcXX`` escapes, as replies do."""
        value = self._get(name, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            raise self._fail(name, value, "a string")
        at = protocol.lone_surrogate(value)
        if at is not None and not (file_name and all(0xDC80 <= ord(ch) <= 0xDCFF for ch in value
                                                     if 0xD800 <= ord(ch) <= 0xDFFF)):
            hint = ("; it stands for a byte of a file name that is not UTF-8: such a name can be listed, shown "
                    "and converted, not used here (rename the file to UTF-8)" if 0xDC80 <= ord(value[at]) <= 0xDCFF
                    else "")
            raise BadRequest(f"{self._type}: parameter {name!r} holds a lone surrogate ({value[at]!a} at "
                             f"character {at}), which is not Unicode text; send UTF-8 text{hint}")
        if choices is not None and value not in choices:
            raise self._fail(name, value, "one of " + ", ".join(choices))
        return value

    def integer(self, name: str, default: Any = _MISSING, *, lo: int | None = None, hi: int | None = None,
            nullable: bool = False) -> Any:
        value = self._get(name, default)
        if value is None and (nullable or default is None):
            return None
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._fail(name, value, "an integer" + (" or null" if nullable else ""))
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self._fail(name, value, _range(lo, hi))
        return value

    def number(self, name: str, default: Any = _MISSING, *, lo: float | None = None,
              hi: float | None = None) -> Any:
        value = self._get(name, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise self._fail(name, value, "a finite number")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self._fail(name, value, _range(lo, hi))
        return float(value)

    def flag(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, bool):
            raise self._fail(name, value, "true or false")
        return value

    def finish(self) -> None:
        """Reject every parameter that no reader asked for (typos, options of another request type)."""
        unknown = sorted(set(self._params) - self._read)
        if unknown:
            known = ", ".join(sorted(self._read)) or "none"
            raise BadRequest(f"{self._type}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                             f"this request takes: {known}")


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    return f">= {lo}" if lo is not None else f"<= {hi}"
