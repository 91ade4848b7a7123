"""
The one conversion of the agent's results into JSON values for the Panel.

The domain returns typed records (frozen dataclasses in ``wire/servers.py``,
``wire/files.py``, ``wire/node.py``); each record module registers its shape
with :func:`to_json` beside the record, so the two transports serialise every
result the same way.  Mappings, lists and tuples are walked; anything else
(``str``, ``int``, ``float``, ``bool``, ``None``) is passed through.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any


@functools.singledispatch
def to_json(value: Any) -> Any:
    """``value`` as plain JSON values (dicts, lists, strings, numbers, booleans, null)."""
    if isinstance(value, Mapping):
        return {str(key): to_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    return value
