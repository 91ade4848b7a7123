"""
The HTTP benchmarks' second client: ``wrk`` (Debian's ``wrk``), a C load
generator, sending the same Panel commands as ``http_latency.Client``.

Why a second client: on a small host the benchmark's own asyncio client
shares the cores with the agent (0.07-0.12 ms of CPU per request, a third of
a core at 16 clients), and every time it is preempted, all 16 requests in
flight wait with it.  A Panel runs on another machine.  ``wrk`` spends a
fraction of that per request, so its figures hold less of the client's own
delays.  The benchmarks print both, and measure the host's floor
(``bench/floor_server.py``) with each client.

``wrk`` runs for whole seconds, not a count of requests: one batch is
``seconds`` of ``clients`` keep-alive connections in one thread, each sending
its next request when its answer is in (closed loop, as the asyncio client),
cycling over ``server_ids``.  Every answer is checked (HTTP 200 and
``"success":true``).  The latencies come back as wrk's histogram (one
microsecond per bucket, from the write of a request to its whole answer), so
batches pool as ``http_latency.pooled`` pools the asyncio client's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, http_latency

from http_latency import FloorServer, cpu_split, figures  # noqa: E402

__all__ = ["WRK", "available", "measure_wrk", "wrk_floor"]

WRK = shutil.which("wrk") or "/usr/bin/wrk"

_SCRIPT = r"""
local bodies = {%(bodies)s}
local headers = {%(headers)s}
local reqs = {}
local index = 0
failures = 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  for i, body in ipairs(bodies) do
    reqs[i] = wrk.format("POST", "/api/command", headers, body)
  end
end

function request()
  index = index %% #reqs + 1
  return reqs[index]
end

function response(status, hdrs, body)
  if status ~= 200 or not string.find(body, '"success"%%s*:%%s*true') then
    failures = failures + 1
  end
end

function done(summary, latency, requests)
  local failed = 0
  for _, thread in ipairs(threads) do
    failed = failed + thread:get("failures")
  end
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%d %%d\n", summary.requests, summary.duration,
    failed, e.connect + e.read + e.write + e.status + e.timeout))
  local i = 1
  while true do
    local value, count = latency(i)
    if value == 0 then break end
    io.write(string.format("L %%d %%d\n", value, count))
    i = i + 1
  end
end
"""


class Target(Protocol):
    port: int
    process: Any

    def headers(self) -> dict[str, str]: ...


def available() -> bool:
    """Whether ``wrk`` is installed here."""
    return os.access(WRK, os.X_OK)


def _lua_string(text: str) -> str:
    level = "=" * 4
    assert "]" + level + "]" not in text
    return "[" + level + "[" + text + "]" + level + "]"


def _script(target: Target, server_ids: list[str], action: str) -> str:
    bodies = ",\n".join(
        _lua_string(json.dumps({"action": action, "serverId": sid, "payload": {}}))
        for sid in server_ids
    )
    headers = ", ".join(
        "[ {} ] = {}".format(_lua_string(k), _lua_string(v)) for k, v in target.headers().items()
    )
    return _SCRIPT % {"bodies": bodies, "headers": headers}


def measure_wrk(
    target: Target,
    server_ids: list[str],
    action: str,
    clients: int,
    seconds: int = 1,
    keep: bool = False,
) -> dict[str, Any]:
    """
    ``seconds`` of ``action`` commands from ``clients`` connections through
    ``wrk``: the same figures as ``http_latency.measure`` (``keep``: every
    latency as well, for ``http_latency.pooled``).
    """
    with tempfile.TemporaryDirectory(prefix="ctrlagent-wrk-") as tmp:
        script = Path(tmp) / "panel.lua"
        script.write_text(_script(target, server_ids, action))
        assert target.process is not None
        user_before, system_before = cpu_split(target.process.pid)
        started = time.perf_counter()
        errors_file = Path(tmp) / "stderr"
        with errors_file.open("wb") as stderr:
            process = subprocess.Popen(
                [WRK, "--threads", "1", "--connections", str(clients),
                 "--duration", "{}s".format(seconds), "--timeout", "5s",
                 "--script", str(script), "http://127.0.0.1:{}/api/command".format(target.port)],
                stdout=subprocess.PIPE, stderr=stderr,
            )
            assert process.stdout is not None
            output = process.stdout.read()
            # Our own child, reaped here: its CPU (the client's share of the host).
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - started
        user_after, system_after = cpu_split(target.process.pid)
        err = errors_file.read_text("utf-8", "replace")
    out = output.decode("utf-8", "replace")
    if process.returncode != 0:
        raise RuntimeError("wrk failed ({}): {}".format(process.returncode, err[-500:]))
    requests = duration_us = failed = errors = 0
    ms: list[float] = []
    for line in out.splitlines():
        parts = line.split()
        if parts[:1] == ["RESULT"]:
            requests, duration_us, failed, errors = (int(x) for x in parts[1:5])
        elif parts[:1] == ["L"]:
            ms.extend([int(parts[1]) / 1000.0] * int(parts[2]))
    if not requests or not ms:
        raise RuntimeError("wrk measured nothing: {!r} {!r}".format(out[-500:], err[-500:]))
    if failed or errors:
        raise RuntimeError("{}: {} failed answers, {} socket errors".format(
            action, failed, errors))
    # The agent's CPU over the whole wrk run (its start and end included).
    return figures(
        action, clients, ms,
        per_s=requests / (duration_us / 1e6),
        user_ms=(user_after - user_before) * 1000,
        system_ms=(system_after - system_before) * 1000,
        client_ms=(usage.ru_utime + usage.ru_stime) * 1000,
        window=[time.time() - elapsed, time.time()],
        keep=keep,
    )


def wrk_floor(body_bytes: int, clients: int, seconds: int = 1) -> dict[str, Any]:
    """``measure_wrk`` against a ``FloorServer`` (the host's floor for this client)."""
    floor = FloorServer(body_bytes).start()
    try:
        run = measure_wrk(floor, ["floor"], "floor", clients, seconds, keep=True)
    finally:
        floor.stop()
    run["action"] = "floor"
    return run
