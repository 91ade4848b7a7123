"""
The ``--demo`` of ``scripts/run-agent``: a real Minetest server that the agent
creates and starts through its own HTTP API.

``prepare_image`` runs before the agent starts: it builds (once, about 40 s,
cached in ``~/.cache/ctrlagent``) and imports the Minetest image, printing
progress while it works.  ``run`` runs once the agent is up: it finds the demo
server the agent already manages (a later run, whose data and state stayed
under ``.dev/``) or creates it, starts it, waits until the game answers its
UDP handshake on the published port and prints how to reach, follow and stop
it.  Every wait is bounded; ``alive()`` ends them early when the agent exits
or the runner is told to stop.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.rig.images import MINETEST_IMAGE, import_minetest

SERVER_ID = "minetest-demo"
_HELLO = bytes.fromhex("4f457403" "0000" "00" "03ffdc01")


def say(line: str) -> None:
    sys.stderr.write("run-agent: demo: {}\n".format(line))
    sys.stderr.flush()


def prepare_image(host: str) -> str:
    """The Minetest image on the engine at ``host``, with progress while it builds."""
    done = threading.Event()
    started = time.monotonic()

    def ticker() -> None:
        while not done.wait(10.0):
            say("still preparing the image ({:.0f} s)".format(time.monotonic() - started))

    say(
        "preparing the Minetest image {} (the first run builds it from Debian's"
        " minetest-server with debootstrap, about 40 s; later runs reuse the cache)".format(
            MINETEST_IMAGE
        )
    )
    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    try:
        image = import_minetest(host)
    finally:
        done.set()
    say("image ready in {:.0f} s".format(time.monotonic() - started))
    return image


class Api:
    """The agent's HTTP API with the node's secret (stdlib only)."""

    def __init__(self, base: str, secret: str) -> None:
        self.base = base.rstrip("/")
        self.secret = secret

    def call(self, method: str, path: str, body: Any = None, timeout: float = 35.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={
                "Authorization": "Bearer " + self.secret,
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            # REST failures are JSON envelopes with their own status.
            try:
                return json.load(e)
            except ValueError:
                raise RuntimeError("{} {}: HTTP {}".format(method, path, e.code)) from None

    def command(self, action: str, server_id: str | None = None, **payload: Any) -> Any:
        body: dict[str, Any] = {"action": action, "payload": payload}
        if server_id is not None:
            body["serverId"] = server_id
        return self.call("POST", "/api/command", body)


def handshake(ip: str, port: int, tries: int = 10) -> bool:
    """Minetest's first reliable packet; the answer starts with its protocol id."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        for _ in range(tries):
            s.sendto(_HELLO, (ip, port))
            try:
                data, _ = s.recvfrom(1024)
            except (TimeoutError, ConnectionRefusedError):
                time.sleep(0.5)
                continue
            if data[:4] != _HELLO[:4]:
                continue
            # Say goodbye with the peer id it gave us, so no half-open peer stays.
            s.sendto(_HELLO[:4] + data[4:6] + bytes.fromhex("000003"), (ip, port))
            return True
    return False


def wait_for(check: Callable[[], bool], alive: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            if check():
                return True
        except (OSError, RuntimeError, ValueError):
            pass
        time.sleep(0.5)
    return False


def create_payload(image: str) -> dict[str, Any]:
    """
    What the Panel sends for a small Minetest server: no ``ports``, so the
    agent allocates one from ``servers.port_range`` on ``default_bind_ip``
    (127.0.0.1 in the demo's config) and fills ``{{SERVER_PORT}}``.
    """
    return {
        "name": "Minetest (ctrlagent demo)",
        "image": image,
        "startup": "/usr/games/minetestserver --port {{SERVER_PORT}}"
        " --world /home/container/world --logfile /home/container/minetest.log",
        "environment": {"HOME": "/home/container"},
        "limits": {"memory": 512, "cpu": 100, "disk": 1024},
        "startupDone": {"pattern": r"listening on \[::\]:\d+", "regex": True},
        "stop": "SIGTERM",
    }


def _published_port(data: dict[str, Any]) -> int | None:
    """The primary allocation of a create answer or a status."""
    entries = [e for e in data.get("allocations") or [] if isinstance(e, dict)]
    entries.sort(key=lambda e: not e.get("primary"))
    for entry in entries:
        port = entry.get("port")
        if isinstance(port, int):
            return port
    return None


def run(
    api: Api, dev: Path, secret_file: str, image: str, alive: Callable[[], bool], api_port: int
) -> bool:
    """Find or create the demo server, start it, check the game answers, say how to use it."""
    if not wait_for(
        lambda: api.call("GET", "/health", timeout=2).get("docker") is True,
        alive,
        60,
    ):
        say("the agent did not report a usable engine on /health within 60 s; no demo")
        return False
    record = dev / "demo.json"
    known = api.call("GET", "/api/servers/" + SERVER_ID)
    port: int | None = None
    if known.get("success"):
        data = known.get("data") or {}
        port = _published_port(data)
        if port is None and record.exists():
            port = json.loads(record.read_text()).get("port")
        say(
            "found server {} (status {}) from an earlier run: re-attached, not created"
            " again".format(SERVER_ID, data.get("status"))
        )
    else:
        say("creating server {}".format(SERVER_ID))
        created = api.command("create_server", SERVER_ID, **create_payload(image))
        if not created.get("success"):
            say("create failed: {}".format(created.get("error") or created))
            return False
        port = _published_port(created.get("data") or {})
        say("the agent allocated port {} on 127.0.0.1 (tcp and udp)".format(port))
        record.write_text(json.dumps({"serverId": SERVER_ID, "port": port}) + "\n")
    if not isinstance(port, int):
        say("the server {} publishes no port; delete it to start over".format(SERVER_ID))
        return False
    status = (api.call("GET", "/api/servers/" + SERVER_ID).get("data") or {}).get("status")
    if status not in ("running", "starting"):
        started = api.call("POST", "/api/servers/{}/power".format(SERVER_ID), {"action": "start"})
        if not started.get("success"):
            say("start failed: {}".format(started.get("error") or started))
            return False
    say("waiting for the game to answer on 127.0.0.1:{}/udp".format(port))
    cli = _cli(secret_file, api_port)
    logs = "/api/servers/{}/logs?lines=50".format(SERVER_ID)
    commands = "/api/servers/{}/commands".format(SERVER_ID)
    power = "/api/servers/{}/power".format(SERVER_ID)
    if not wait_for(lambda: handshake("127.0.0.1", port, tries=2), alive, 90):
        say("the game did not answer its UDP handshake within 90 s; its console:")
        say(_curl_hint(secret_file, api_port, "GET", logs))
        return False
    lines = [
        "",
        "Minetest server '{}' is running, created and started through the agent's API.".format(
            SERVER_ID
        ),
        "  join it:         a Minetest client, address 127.0.0.1, port {}".format(port),
        "  follow its console and type commands (Ctrl-C leaves it running):",
        "                   {} console {}".format(cli, SERVER_ID),
        "  stop / start it: {} power {} stop|start".format(cli, SERVER_ID),
        "  the same over the REST API:",
        "  its console:     " + _curl_hint(secret_file, api_port, "GET", logs),
        "  send a command:  "
        + _curl_hint(secret_file, api_port, "POST", commands, '{"command":"/status"}'),
        "  stop it:         "
        + _curl_hint(secret_file, api_port, "POST", power, '{"action":"stop"}'),
        "  Ctrl-C stops the agent (and a private engine it started); the world stays in"
        " {}/servers/{} and the next --demo run re-attaches it.".format(dev, SERVER_ID),
        "",
    ]
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()
    return True


def _cli(secret_file: str, port: int) -> str:
    """The operator CLI of the environment running the agent, pointed at it."""
    exe = Path(sys.executable).with_name("ctrlagent")
    prog = str(exe) if exe.exists() else "{} -m ctrlagent.cli".format(sys.executable)
    return "{} --url http://127.0.0.1:{} --secret-file {}".format(prog, port, secret_file)


def _curl_hint(
    secret_file: str, port: int, method: str, path: str, body: str | None = None
) -> str:
    parts = ["curl -s"]
    if method != "GET":
        parts.append("-X " + method)
    parts.append('-H "Authorization: Bearer $(cat {})"'.format(secret_file))
    if body is not None:
        parts.append("-H 'Content-Type: application/json' -d '{}'".format(body))
    parts.append("'http://127.0.0.1:{}{}'".format(port, path))
    return " ".join(parts)
