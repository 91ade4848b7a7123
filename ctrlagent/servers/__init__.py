"""
Game-server lifecycle: one ``Server`` per game server and the ``ServerManager``
service that owns them (PROTOCOL.md section 2).

- ``spec``: the pure ``create_server`` payload parser (no engine field names);
- ``containers``: a spec's containers as the engine seam's ``ContainerSpec``;
- ``lifecycle``: the states, the inputs, the one table of moves, the Panel's
  status mapping, ``ExitWatch`` and ``PowerSlot``;
- ``console``: the ring buffer, the flood throttle and the console pipeline
  (follow, recover from the mark, stdin);
- ``delivery``: the event bus, console delivery and its durable marks;
- ``stats``, ``installer``, ``datadir``: a server's resource samples, its
  install script, its data directory;
- ``store``: the durable SQLite store of definitions and desired state;
- ``ports``: the node's port range, allocated to servers created without ports;
- ``services``: what a ``Server`` is given (it never reaches the manager);
- ``server`` / ``manager``: one server's power orchestration / the set of servers.

The package speaks the container engine only through
``ctrlagent.engine.interface`` (``IContainerEngine``), never a runtime's module.
"""
