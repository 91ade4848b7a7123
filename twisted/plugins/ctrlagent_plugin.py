"""The twistd plugin: ``twistd -n ctrlagent``, loaded lazily from ``ctrlagent.tap``."""

from twisted.application.service import ServiceMaker

ctrlagent = ServiceMaker(
    "ctrlagent",
    "ctrlagent.tap",
    "Ctrl-Alt-Play node agent: runs game servers in Docker for the Panel",
    "ctrlagent",
)
