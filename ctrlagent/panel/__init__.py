"""
The agent's WebSocket link to the Panel (PROTOCOL.md section 3).

``link`` holds ``PanelLink``, the service that dials the Panel, reconnects
with backoff, answers commands through the shared dispatcher and forwards
server events; ``protocol`` the thin Autobahn protocol and the write flow of
one connection; ``outbox`` what waits for the Panel (outbox, console batches,
the read back-pressure); ``backoff`` the reconnect schedule and the URL.  The
frames themselves are ``ctrlagent.wire``'s.
"""
