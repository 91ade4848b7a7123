"""
The Panel's shapes, and nothing else: commands as both transports receive
them (``command``), the WebSocket frames (``frames``) and the HTTP body
decoder (``jsonbody``).  Pure: no reactor, no I/O.
"""
