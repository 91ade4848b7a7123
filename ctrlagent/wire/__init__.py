"""
The Panel's shapes, and nothing else.  Pure: no reactor, no I/O.

- ``command``: commands as both transports receive them, and the one payload check;
- ``json``: results as JSON values (``to_json``), the one encoder (``encode``)
  and the decoders of HTTP bodies and WebSocket frames;
- ``time``: the one timestamp format (``iso_ms``);
- ``tables``: power words, legacy frame types, action aliases, error codes
  and their REST statuses;
- ``http``: the HTTP answer envelopes;
- ``incoming`` / ``frames``: the WebSocket frames the Panel sends / the agent sends.
"""

from ctrlagent.wire.json import encode, to_json

__all__ = ["encode", "to_json"]
