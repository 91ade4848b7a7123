"""
The agent's WebSocket link to the Panel (PROTOCOL.md section 3).

``messages`` parses and builds frames (pure); ``link`` holds ``PanelLink``, the
service that dials the Panel, reconnects with backoff, answers commands through
the shared dispatcher and forwards server events.
"""
