"""
Server files, confined to each server's directory.

``paths`` (pure rules for Panel paths), ``confined`` (race-free resolution
beneath a root fd), ``trees`` (every walk of a tree: iterative, bounded, by
directory fd), ``fsops`` and ``archives`` (the blocking operations),
``mods`` and ``fetch`` (mod installs and SSRF-safe downloads), and
``manager.FileManager``, the ``IFileManager`` the dispatcher calls.  Results
are the records of ``ctrlagent.wire.files``, which also holds their shapes on
the wire.
"""
