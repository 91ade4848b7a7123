"""
Container engines: the runtimes game servers run on.

``docker/`` speaks the Docker Engine API (treq over the Unix socket, a raw
hijacked attach for stdin).  The engine-neutral seam the server domain needs
(``engine/interface.py``) and a second runtime come with the core reshaping.
"""
