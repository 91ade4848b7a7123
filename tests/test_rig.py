"""
The test rig itself: the engine fixture and the test images behave as the
other suites assume.  Driven through the docker CLI so that a rig defect is
not hidden by a defect in our own client.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.docker


@pytest.fixture
def docker(docker_engine: object) -> Iterator[object]:
    created: list[str] = []
    env = dict(os.environ, DOCKER_HOST=docker_engine.host)  # type: ignore[attr-defined]

    def run(*args: str, stdin: bytes | None = None, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["docker", *args], input=stdin, capture_output=True, env=env, timeout=timeout, check=False
        )

    def container(*args: str) -> str:
        name = "ctrlagent-t-rig-" + uuid.uuid4().hex[:8]
        created.append(name)
        result = run("run", "-d", "-i", "--name", name, *args)
        assert result.returncode == 0, result.stderr
        return name

    run.container = container  # type: ignore[attr-defined]
    yield run
    if created:
        run("rm", "-f", *created)


def _wait_exit(docker: object, name: str, timeout: float = 10) -> int:
    result = docker("wait", name, timeout=timeout)  # type: ignore[operator]
    return int(result.stdout.strip())


def test_scripted_server_echoes_console_and_stops_on_command(docker: object, scripted_image: str) -> None:
    result = docker("run", "--rm", "-i", scripted_image, stdin=b"hello\nsay hi\nstop\n")  # type: ignore[operator]
    out = result.stdout.decode()
    assert result.returncode == 0
    assert "Done (0.1s)!" in out
    assert "> hello" in out and "[Server] hi" in out and "Stopping server (console)" in out


def test_scripted_server_crashes_with_the_requested_code(docker: object, scripted_image: str) -> None:
    result = docker("run", "--rm", "-i", "-e", "CRASH_AFTER=0.2", "-e", "CRASH_CODE=7", scripted_image, stdin=b"")  # type: ignore[operator]
    assert result.returncode == 7


def test_scripted_server_exits_cleanly_on_sigterm_unless_told_to_ignore_it(
    docker: object, scripted_image: str
) -> None:
    graceful = docker.container(scripted_image)  # type: ignore[attr-defined]
    stubborn = docker.container("-e", "IGNORE_SIGTERM=1", scripted_image)  # type: ignore[attr-defined]
    time.sleep(0.5)
    docker("kill", "-s", "TERM", graceful, stubborn)  # type: ignore[operator]
    assert _wait_exit(docker, graceful) == 0
    time.sleep(0.5)
    state = docker("inspect", "-f", "{{.State.Running}}", stubborn).stdout.strip()  # type: ignore[operator]
    assert state == b"true"


def test_scripted_server_floods_every_line_in_order(docker: object, scripted_image: str) -> None:
    result = docker("run", "--rm", "-i", "-e", "FLOOD_LINES=20000", scripted_image, stdin=b"stop\n")  # type: ignore[operator]
    lines = result.stdout.decode().splitlines()
    numbers = [int(line) for line in lines if line.isdigit()]
    assert numbers == list(range(1, 20001))


def test_scripted_server_memory_hog_is_oom_killed(docker: object, scripted_image: str) -> None:
    name = docker.container("-m", "32m", "--memory-swap", "32m", "-e", "MEMORY_HOG_MB=128", scripted_image)  # type: ignore[attr-defined]
    assert _wait_exit(docker, name) == 137
    assert docker("inspect", "-f", "{{.State.OOMKilled}}", name).stdout.strip() == b"true"  # type: ignore[operator]


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_minetest_answers_a_handshake_on_its_published_port(docker: object, minetest_image: str) -> None:
    port = _free_udp_port()
    name = docker.container("-p", "127.0.0.1:{}:30000/udp".format(port), minetest_image)  # type: ignore[attr-defined]
    hello = bytes.fromhex("4f457403" "0000" "00" "03ffdc" "01")
    deadline = time.monotonic() + 20
    answer = b""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        while time.monotonic() < deadline and not answer:
            s.sendto(hello, ("127.0.0.1", port))
            try:
                answer, _ = s.recvfrom(1024)
            except TimeoutError:
                continue
        assert answer.startswith(bytes.fromhex("4f457403")), docker("logs", name).stdout  # type: ignore[operator]
        peer_id = answer[4:6]
        s.sendto(bytes.fromhex("4f457403") + peer_id + b"\x00\x00\x03", ("127.0.0.1", port))
    docker("stop", "-t", "10", name)  # type: ignore[operator]
    assert _wait_exit(docker, name) == 0
