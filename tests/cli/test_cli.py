"""
The ``ctrlagent`` command's pure parts: where the agent answers (from its
configuration), which console lines are new, and what the diagnostics hide.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctrlagent.cli.client import CliError, target_of
from ctrlagent.cli.diagnostics import REDACTED, redacted
from ctrlagent.cli.main import environment, new_lines, terminal_safe
from ctrlagent.config import AgentConfig, HttpConfig, MetricsConfig


def config(**http: object) -> AgentConfig:
    return AgentConfig(secret="s", http=HttpConfig(**http))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("http", "where"),
    [
        ({}, "http://127.0.0.1:8081"),
        ({"bind": "10.0.0.5", "port": 9000}, "http://10.0.0.5:9000"),
        ({"tls_cert": "/c.pem"}, "https://127.0.0.1:8081"),
        ({"endpoint": "tcp:8444:interface=127.0.0.1"}, "http://127.0.0.1:8444"),
        ({"endpoint": "ssl:8443:privateKey=k.pem:certKey=c.pem"}, "https://127.0.0.1:8443"),
        ({"endpoint": "tcp6:port=8081:interface=\\:\\:1"}, "http://[::1]:8081"),
        ({"endpoint": "unix:/run/ctrlagent.sock"}, "unix:/run/ctrlagent.sock"),
    ],
)
def test_the_command_finds_the_agent_where_its_configuration_says(
    http: dict[str, object], where: str
) -> None:
    assert target_of(config(**http)).describe() == where


def test_an_endpoint_it_cannot_read_asks_for_url() -> None:
    with pytest.raises(CliError, match="--url"):
        target_of(config(endpoint="systemd:domain=INET:index=0"))
    assert target_of(config(endpoint="systemd:domain=INET:index=0"),
                     "https://node.example:8443").describe() == "https://node.example:8443"


@given(st.lists(st.sampled_from("abc"), max_size=8), st.lists(st.sampled_from("xyz"), max_size=8),
       st.integers(min_value=0, max_value=8))
def test_a_look_at_the_console_prints_exactly_the_lines_that_came_since(
    before: list[str], after: list[str], window_cut: int
) -> None:
    # The console's last lines before and now (a window that may have moved on).
    previous = before
    current = (before + after)[min(window_cut, len(before)):]
    assert new_lines(previous, current) == after


def test_diagnostics_redact_every_secret_of_the_tree() -> None:
    tree = dataclasses.asdict(dataclasses.replace(
        AgentConfig(secret="node-secret"), metrics=MetricsConfig(token="scrape-token")))
    tree["docker"]["registry_auths"] = {"r.example": {"password": "pw"}}
    shown = redacted(tree)
    assert shown["secret"] == REDACTED and shown["metrics"]["token"] == REDACTED
    assert shown["docker"]["registry_auths"] == REDACTED
    assert "node-secret" not in str(shown) and "scrape-token" not in str(shown)
    assert shown["node_id"] == "node-1"


def test_the_agents_environment_file_is_read_under_this_shells_environment(
    tmp_path: Path,
) -> None:
    env_file = tmp_path / "env"
    env_file.write_text(
        "# as systemd's EnvironmentFile=\nAGENT_SECRET_FILE=/etc/ctrlagent/secret\n"
        "NODE_ID=\"node-7\"\nHEALTH_PORT=9001\n\nnot a setting\n",
        encoding="utf-8",
    )
    merged = environment(str(env_file), {"HEALTH_PORT": "9002"})
    assert merged == {
        "AGENT_SECRET_FILE": "/etc/ctrlagent/secret", "NODE_ID": "node-7", "HEALTH_PORT": "9002",
    }
    with pytest.raises(CliError, match="environment file"):
        environment(str(tmp_path / "missing"), {})


def test_the_command_starts_without_twisted() -> None:
    import subprocess
    import sys

    probe = "import sys, ctrlagent.cli.main; print(sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'treq', 'klein', 'prometheus_client')))"  # noqa: E501
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "[]"


CONSOLE_CHARS = ["a", " ", "\t", "\x1b", "[", "3", "1", ";", "m", "\x07", "\r", "\x9b", "]", "0",
                 "\x00", "é", "\u202e"]


@given(st.text(alphabet=st.sampled_from(CONSOLE_CHARS), max_size=40))
def test_a_console_line_reaches_the_terminal_with_colours_at_most(line: str) -> None:
    shown = terminal_safe(line)
    # Without its colour sequences, nothing but printable text and tabs is left.
    bare = re.sub(r"\x1b\[[0-9;]{0,32}m", "", shown)
    assert all(c == "\t" or c.isprintable() for c in bare), repr(shown)


def test_a_hostile_console_line_cannot_move_the_cursor_or_retitle_the_terminal() -> None:
    assert terminal_safe("\x1b[31mred\x1b[0m") == "\x1b[31mred\x1b[0m"
    assert terminal_safe("\x1b]0;owned\x07\x1b[2J\x1b[H") == "?]0;owned??[2J?[H"
