"""The one line an operator reads when the agent cannot start."""

from __future__ import annotations

import errno
import os

import pytest
from twisted.internet.error import CannotListenError

from ctrlagent.startup import StartupError, describe_startup_failure, listen_failure


def test_a_startup_error_is_its_own_text_on_one_line() -> None:
    error = StartupError("state store /x is damaged\n(disk image is malformed)")
    assert describe_startup_failure(error) == "state store /x is damaged (disk image is malformed)"


def test_a_port_in_use_names_the_address_and_the_likely_cause() -> None:
    error = CannotListenError("0.0.0.0", 8081, OSError(errno.EADDRINUSE, "Address already in use"))
    assert describe_startup_failure(error) == (
        "cannot listen for the HTTP API on 0.0.0.0:8081 (address already in use);"
        " is another agent or program using it?"
    )
    line = str(listen_failure("tcp:8081:interface=0.0.0.0", error))
    assert line.startswith("cannot listen for the HTTP API on tcp:8081:interface=0.0.0.0 (")


def test_an_os_error_names_the_path_it_acted_on() -> None:
    error = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "1234", None, b"/run/x.lock")
    assert describe_startup_failure(error) == "No such file or directory: /run/x.lock"


def test_an_unexpected_error_still_fits_one_line_and_says_where() -> None:
    try:
        {}["missing"]
    except KeyError as e:
        line = describe_startup_failure(e)
    assert line.startswith("unexpected KeyError: 'missing' (at test_describe.py:")
    assert "\n" not in line


@pytest.mark.parametrize("error", [ValueError("a\nb"), RuntimeError(""), OSError()])
def test_any_error_is_one_line(error: Exception) -> None:
    line = describe_startup_failure(error)
    assert line and "\n" not in line
