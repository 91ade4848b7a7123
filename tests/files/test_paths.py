"""Property tests of the pure path rules (``ctrlagent.files.paths``)."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctrlagent.errors import InvalidInput, PermissionDenied
from ctrlagent.files.paths import (
    chunk_components,
    display,
    member_components,
    normalise,
    parse_mode,
    safe_file_name,
    split_chunk,
)

names = st.text(alphabet=st.characters(blacklist_characters="/\x00",
                                       blacklist_categories=("Cs",)), min_size=1, max_size=20)
segments = st.one_of(names, st.sampled_from(["..", ".", "", "%2e%2e", "..%2f", "\\.."]))
paths = st.lists(segments, max_size=12).map("/".join)


@given(paths, st.booleans())
def test_normalised_components_never_climb_and_are_plain_names(path: str, lead: bool) -> None:
    path = ("/" if lead else "") + path
    try:
        comps = normalise(path)
    except PermissionDenied:
        # Refused exactly when a lexical walk would go above the root.
        depth = 0
        for part in path.split("/"):
            if part == "..":
                depth -= 1
                if depth < 0:
                    return
            elif part not in ("", "."):
                depth += 1
        raise AssertionError("refused a path that stays inside: {!r}".format(path)) from None
    for c in comps:
        assert c not in ("", ".", "..")
        assert "/" not in c and "\x00" not in c
    # Same meaning as POSIX lexical normalisation beneath a root.
    expected = posixpath.normpath("/" + path).lstrip("/")
    assert "/".join(comps) == ("" if expected == "." else expected)


@given(paths)
def test_normalise_is_idempotent(path: str) -> None:
    try:
        comps = normalise(path)
    except PermissionDenied:
        return
    assert normalise(display(comps)) == comps
    assert normalise("/".join(comps)) == comps


@given(paths, st.integers(min_value=0, max_value=len("ab")))
def test_nul_anywhere_is_refused(path: str, where: int) -> None:
    with pytest.raises(InvalidInput):
        normalise(path[:where] + "\x00" + path[where:])


@pytest.mark.parametrize("path,comps", [
    ("", ()), ("/", ()), ("//", ()), ("a//b", ("a", "b")), ("/a/./b/", ("a", "b")),
    ("a/../b", ("b",)), ("%2e%2e/x", ("%2e%2e", "x")), ("..%2f..%2fx", ("..%2f..%2fx",)),
    ("..\\..\\x", ("..\\..\\x",)), ("...", ("...",)),
])
def test_examples(path: str, comps: tuple[str, ...]) -> None:
    assert normalise(path) == comps


@pytest.mark.parametrize("path", ["..", "../", "/..", "a/../..", "a/b/../../../c", "./.."])
def test_climbing_is_refused(path: str) -> None:
    with pytest.raises(PermissionDenied):
        normalise(path)


def test_overlong_names_are_refused() -> None:
    with pytest.raises(InvalidInput):
        normalise("a" * 256)
    with pytest.raises(InvalidInput):
        normalise("a/" * 3000)


def test_archive_member_leading_slash_is_neutralised_and_dotdot_refused() -> None:
    assert member_components("/etc/passwd") == ("etc", "passwd")
    with pytest.raises(PermissionDenied):
        member_components("../x")


@pytest.mark.parametrize("mode,value", [("644", 0o644), ("0755", 0o755), ("1777", 0o1777),
                                        (0o600, 0o600)])
def test_modes(mode: object, value: int) -> None:
    assert parse_mode(mode) == value


@pytest.mark.parametrize("mode", ["4755", "2755", "6755"])
def test_setuid_setgid_refused(mode: str) -> None:
    with pytest.raises(PermissionDenied):
        parse_mode(mode)


@pytest.mark.parametrize("mode", ["", "644\n", "888", "12", "12345", "rwx", "0o644", None, True])
def test_bad_modes(mode: object) -> None:
    with pytest.raises(InvalidInput):
        parse_mode(mode)


@given(st.lists(names, min_size=1, max_size=4), st.integers(min_value=0, max_value=999999))
def test_chunk_names_round_trip(comps: list[str], index: int) -> None:
    target = tuple(comps)
    assert split_chunk(chunk_components(target, index)) == (target, index)


def test_safe_file_name() -> None:
    assert safe_file_name("mod.jar") == "mod.jar"
    for bad in ("", ".", "..", "a/b", "a\x00", ".ctrlagent-mods.json"):
        assert safe_file_name(bad) is None


@pytest.mark.parametrize("name", ["a.chunk01", "a.chunk00", "a.chunk0001", "a.chunk1234567"])
def test_chunk_indices_are_canonical(name: str) -> None:
    # Two names for one index would make two files claim one place.
    assert split_chunk(("dir", name)) is None
