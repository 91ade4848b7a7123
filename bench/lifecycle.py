"""
Benchmark of the game-server lifecycle.

1. Start overhead: time from ``ServerManager.start`` to ``running`` (the
   startup line seen on the console) against the same container body started
   directly through the Docker API and its log followed until the same line,
   in the same run, alternating, N rounds each; medians and their ratio.
2. Agent footprint: RSS and CPU of this process (reactor + manager + Docker
   client, i.e. the agent's server side) while managing 0, 10 and 50 running
   idle scripted servers with stats sampling on (the default 2 s interval).

Runtime (``--runtime``): ``docker``, the engine at ``DOCKER_HOST`` when it
answers, else a private dockerd; or ``podman``, a private ``podman system
service`` (the agent with ``runtime.kind = "podman"``, the direct start
through the same service's API).  Every container created is removed by id
at the end.

    python bench/lifecycle.py [--runtime docker|podman] [--rounds 10] [--servers 0,10,50]
                              [--window 20]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred

from ctrlagent.config import AgentConfig, DockerConfig, ServersConfig
from ctrlagent.engine import engine_client_config, make_engine
from ctrlagent.engine.docker.bodies import create_body
from ctrlagent.engine.docker.client import DockerClient
from ctrlagent.engine.podman.engine import service_rlimits, with_host_rlimits
from ctrlagent.events import StatusChanged
from ctrlagent.servers import containers
from ctrlagent.servers.manager import ServerManager
from ctrlagent.servers.store import open_store
from tests.rig.runtime import RUNTIMES, Runtime, bench_runtime

STARTUP_LINE = "Done (0.1s)! For help, type help"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def payload(image: str) -> dict[str, Any]:
    return {
        "name": "bench",
        "image": image,
        "startup": "/usr/local/bin/gameserver",
        "limits": {"memory": 32, "cpu": 50},
        "stop": {"type": "command", "value": "stop", "timeout": 2},
        "startupDone": "Done (",
        "crashRestart": False,
    }


async def sleep(reactor: Any, seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def wait_for(reactor: Any, predicate: Any, timeout: float) -> None:
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await sleep(reactor, 0.005)
    raise RuntimeError("timed out")


async def direct_start(reactor: Any, client: DockerClient, cid: str, run: int) -> float:
    """
    Start ``cid`` through the API and follow its log until the startup line
    of its ``run``-th start (counted: Podman's log stamps are whole seconds,
    so ``since`` cannot tell this run's lines from the last one's).
    """
    t0 = time.perf_counter()
    await client.container_start(cid)
    stream = client.logs(cid, follow=True)
    seen = 0
    try:
        async for batch in stream.batches():
            seen += sum(STARTUP_LINE in line for _, line in batch)
            if seen >= run:
                break
    finally:
        stream.close()
    return time.perf_counter() - t0


async def main(reactor: Any, args: argparse.Namespace, runtime: Runtime, image: str) -> None:
    host = runtime.host
    tmp = tempfile.mkdtemp(prefix="ctrlagent-bench-")
    config = AgentConfig(
        development=True,
        state_dir=os.path.join(tmp, "state"),
        data_dir=os.path.join(tmp, "data"),
        docker=DockerConfig(host=host),
        runtime=runtime.config(),
        servers=ServersConfig(stats_interval=2.0, disk_check_interval=60.0, stop_timeout=2.0),
    )
    client = DockerClient.from_config(reactor, engine_client_config(config))
    manager = ServerManager(reactor, config, make_engine(reactor, config, client),
                            open_store(reactor, config.state_dir))
    running: set[str] = set()

    def on_event(event: Any) -> None:
        if isinstance(event, StatusChanged):
            if event.current == "running":
                running.add(event.server_id)
            else:
                running.discard(event.server_id)

    manager.add_listener(on_event)
    manager.startService()
    ids: list[str] = []
    direct_ids: list[str] = []
    tag = uuid.uuid4().hex[:6]
    try:
        print("runtime: {} at {}".format(runtime.kind, host))

        # -- 1. start overhead -------------------------------------------------
        sid = "bench-{}-start".format(tag)
        ids.append(sid)
        await manager.create_server(sid, payload(image))
        server = manager.get(sid)
        spec = containers.server_container(server.spec, server.data_path, config.servers,
                                           "bridge")
        if runtime.kind == "podman":
            # What PodmanEngine adds to every create (its default rlimits).
            spec = replace(spec, ulimits=with_host_rlimits(
                spec.ulimits, service_rlimits(host[len("unix://"):])))
        body = create_body(spec)
        body["Labels"] = {**body["Labels"], containers.SERVER_ID_LABEL: sid + "-direct",
                          containers.MANAGED_LABEL: "bench"}
        direct_name = "ctrl-alt-play-bench-{}-direct".format(tag)
        direct_cid = await client.container_create(direct_name, body)
        direct_ids.append(direct_cid)
        agent_times: list[float] = []
        direct_times: list[float] = []
        for run in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            await manager.start(sid)
            await wait_for(reactor, lambda: sid in running, 10)
            agent_times.append(time.perf_counter() - t0)
            await manager.kill(sid)

            direct_times.append(await direct_start(reactor, client, direct_cid, run))
            await client.container_kill(direct_cid, "SIGKILL")
            await client.container_wait(direct_cid)
        agent = statistics.median(agent_times)
        direct = statistics.median(direct_times)
        print("start to running, median of {} rounds:".format(args.rounds))
        print("  agent  {:7.1f} ms   (min {:.1f}, max {:.1f})".format(
            agent * 1000, min(agent_times) * 1000, max(agent_times) * 1000))
        print("  direct {:7.1f} ms   (min {:.1f}, max {:.1f})".format(
            direct * 1000, min(direct_times) * 1000, max(direct_times) * 1000))
        print("  overhead {:+.1f} %  (target < 10 %)".format((agent / direct - 1) * 100))
        await manager.delete(sid, purge_files=True)
        ids.remove(sid)

        # -- 2. footprint ------------------------------------------------------
        counts = [int(x) for x in args.servers.split(",") if x.strip()]
        made = 0
        print("footprint with stats sampling every {:g} s, {:g} s windows:".format(
            config.servers.stats_interval, args.window))
        for count in counts:
            while made < count:
                sid = "bench-{}-{}".format(tag, made)
                ids.append(sid)
                await manager.create_server(sid, payload(image))
                await manager.start(sid)
                made += 1
            await wait_for(reactor, lambda n=count: len(running) >= n, 60)
            await sleep(reactor, 3.0)  # settle: first samples, attaches
            c0, w0 = cpu_seconds(), time.perf_counter()
            peak = rss_mb()
            for _ in range(int(args.window)):
                await sleep(reactor, 1.0)
                peak = max(peak, rss_mb())
            cpu = (cpu_seconds() - c0) / (time.perf_counter() - w0) * 100
            print("  {:3d} servers: RSS {:6.1f} MB (peak {:6.1f}), CPU {:5.2f} % of one core"
                  .format(count, rss_mb(), peak, cpu))
        print("  targets at 50 servers: RSS < 60 MB, CPU < 5 %")
    finally:
        for sid in list(ids):
            try:
                await manager.delete(sid, purge_files=True)
            except Exception as e:  # noqa: BLE001 - best-effort cleanup, keep going
                print("cleanup of {}: {}".format(sid, e), file=sys.stderr)
        for cid in direct_ids:
            await client.container_remove(cid, force=True)
        await manager.stopService()
        await client.close()
        shutil.rmtree(tmp, ignore_errors=True)


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", choices=RUNTIMES, default="docker")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--servers", default="0,10,50")
    parser.add_argument("--window", type=float, default=20.0)
    args = parser.parse_args()

    with bench_runtime(args.runtime) as (runtime, image):

        def go(reactor: Any) -> Deferred[None]:
            return defer.ensureDeferred(main(reactor, args, runtime, image))

        try:
            task.react(go)
        except SystemExit as e:
            if e.code:
                raise


if __name__ == "__main__":
    run()
