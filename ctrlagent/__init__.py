"""ctrlagent: the Ctrl-Alt-Play node agent (a Wings-style daemon) on Twisted."""

__version__ = "0.1.0"
