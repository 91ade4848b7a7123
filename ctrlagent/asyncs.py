"""``async_to_deferred`` (now in ``ctrlagent.work``), under the name its callers import."""

from ctrlagent.work import async_to_deferred as async_to_deferred  # noqa: F401
