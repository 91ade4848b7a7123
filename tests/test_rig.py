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

from tests.conftest import Engine

pytestmark = pytest.mark.docker


class DockerCli:
    """The docker CLI against the rig's engine; removes what it created."""

    def __init__(self, host: str) -> None:
        self.env = dict(os.environ, DOCKER_HOST=host)
        self.created: list[str] = []

    def __call__(
        self, *args: str, stdin: bytes | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["docker", *args],
            input=stdin,
            capture_output=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )

    def container(self, *args: str) -> str:
        """Start a detached container with stdin open; return its name."""
        name = "ctrlagent-t-rig-" + uuid.uuid4().hex[:8]
        self.created.append(name)
        result = self("run", "-d", "-i", "--name", name, *args)
        assert result.returncode == 0, result.stderr
        return name

    def wait_exit(self, name: str, timeout: float = 10) -> int:
        return int(self("wait", name, timeout=timeout).stdout.strip())

    def inspect(self, name: str, template: str) -> bytes:
        return self("inspect", "-f", template, name).stdout.strip()


@pytest.fixture
def docker(docker_engine: Engine) -> Iterator[DockerCli]:
    cli = DockerCli(docker_engine.host)
    yield cli
    if cli.created:
        cli("rm", "-f", *cli.created)


def test_scripted_server_echoes_console_and_stops_on_command(
    docker: DockerCli, scripted_image: str
) -> None:
    result = docker("run", "--rm", "-i", scripted_image, stdin=b"hello\nsay hi\nstop\n")
    out = result.stdout.decode()
    assert result.returncode == 0
    assert "Done (0.1s)!" in out
    assert "> hello" in out and "[Server] hi" in out and "Stopping server (console)" in out


def test_scripted_server_crashes_with_the_requested_code(
    docker: DockerCli, scripted_image: str
) -> None:
    result = docker(
        "run",
        "--rm",
        "-i",
        "-e",
        "CRASH_AFTER=0.2",
        "-e",
        "CRASH_CODE=7",
        scripted_image,
        stdin=b"",
    )
    assert result.returncode == 7


def test_scripted_server_exits_cleanly_on_sigterm_unless_told_to_ignore_it(
    docker: DockerCli, scripted_image: str
) -> None:
    graceful = docker.container(scripted_image)
    stubborn = docker.container("-e", "IGNORE_SIGTERM=1", scripted_image)
    time.sleep(0.5)
    docker("kill", "-s", "TERM", graceful, stubborn)
    assert docker.wait_exit(graceful) == 0
    time.sleep(0.5)
    state = docker.inspect(stubborn, "{{.State.Running}}")
    assert state == b"true"


def test_scripted_server_floods_every_line_in_order(docker: DockerCli, scripted_image: str) -> None:
    result = docker("run", "--rm", "-i", "-e", "FLOOD_LINES=20000", scripted_image, stdin=b"stop\n")
    lines = result.stdout.decode().splitlines()
    numbers = [int(line) for line in lines if line.isdigit()]
    assert numbers == list(range(1, 20001))


def test_scripted_server_memory_hog_is_oom_killed(docker: DockerCli, scripted_image: str) -> None:
    name = docker.container(
        "-m", "32m", "--memory-swap", "32m", "-e", "MEMORY_HOG_MB=128", scripted_image
    )
    assert docker.wait_exit(name) == 137
    assert docker.inspect(name, "{{.State.OOMKilled}}") == b"true"


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_minetest_answers_a_handshake_on_its_published_port(
    docker: DockerCli, minetest_image: str
) -> None:
    port = _free_udp_port()
    name = docker.container("-p", "127.0.0.1:{}:30000/udp".format(port), minetest_image)
    hello = bytes.fromhex("4f45740300000003ffdc01")
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
        assert answer.startswith(bytes.fromhex("4f457403")), docker("logs", name).stdout
        peer_id = answer[4:6]
        s.sendto(bytes.fromhex("4f457403") + peer_id + b"\x00\x00\x03", ("127.0.0.1", port))
    docker("stop", "-t", "10", name)
    assert docker.wait_exit(name) == 0
