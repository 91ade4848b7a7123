"""
Game-server lifecycle: one ``Server`` per game server and the ``ServerManager``
service that owns them (PROTOCOL.md section 2).

- ``spec``: the pure ``create_server`` payload parser and Docker create body;
- ``states``: the state vocabulary and the Panel's status mapping;
- ``console``: the per-server ring buffer and flood throttle;
- ``store``: the durable SQLite store of definitions and desired state;
- ``server`` / ``manager``: the parts that drive the Docker engine.
"""
