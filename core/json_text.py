"""JSON text that every JSON reader accepts: non-finite numbers become ``null``.

Python's ``json.dumps`` writes ``NaN`` and ``Infinity`` for non-finite floats by default; they are not JSON
(RFC 8259), and strict readers (``jq``, JavaScript's ``JSON.parse``, Go) reject the whole line. Such values
do reach results: a diverged training run's loss, an embedding file whose vectors hold NaN shown by
``!inspect``. The protocol and scripted sessions therefore write through :func:`dumps`, which keeps the
common path a single ``json.dumps`` call and only walks the message when it held a non-finite number.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth of dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    """``json.dumps(value, **options)`` that never writes ``NaN``/``Infinity`` (they become ``null``).

    ``options`` are ``json.dumps``'s; ``allow_nan`` is always False. Values a ``default=`` hook turns into
    floats are not walked (the hooks used here turn values into strings).
    """
    options["allow_nan"] = False
    try:
        return json.dumps(value, **options)
    except ValueError:  # "Out of range float values are not JSON compliant"
        return json.dumps(finite(value), **options)
