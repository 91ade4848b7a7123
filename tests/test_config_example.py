"""
packaging/agent.toml.example: generated from the configuration tree, complete, and the defaults.

The example is written by ``scripts/config-example``; these tests fail when it
drifts from ``ctrlagent/config.py``, when a key is missing, when a value in it is
not the agent's default, and when the script's view of environment variables
and options disagrees with the agent's.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ctrlagent import config as config_module
from ctrlagent.config import ENVIRONMENT, AgentConfig, load_config
from ctrlagent.tap import Options

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "config-example"
EXAMPLE = ROOT / "packaging" / "agent.toml.example"
REGENERATE = "scripts/config-example > packaging/agent.toml.example"


def _load_script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("config_example", str(SCRIPT))
    spec = importlib.util.spec_from_loader("config_example", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


script = _load_script()


def _sections() -> dict[str, list[dataclasses.Field[Any]]]:
    """
    Table name ("" for the top level, dotted for a nested one such as
    ``backups.s3``) -> its scalar fields, in declaration order (a table
    before its sub-tables, as the example writes them).
    """
    out: dict[str, list[dataclasses.Field[Any]]] = {}

    def walk(cls: type, table: str) -> None:
        out[table] = []
        nested = []
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            if dataclasses.is_dataclass(default):
                nested.append((type(default), (table + "." if table else "") + f.name))
            else:
                out[table].append(f)
        for sub, name in nested:
            walk(sub, name)

    walk(AgentConfig, "")
    return out


def _table(tree: Any, table: str) -> Any:
    """The mapping of ``table`` (dotted) inside ``tree``."""
    for part in table.split(".") if table else []:
        tree = tree[part]
    return tree


def _secret(table: str, name: str) -> bool:
    return ((table + "." if table else "") + name) in script.SECRETS


def _keys_by_table(text: str) -> dict[str, list[str]]:
    """Table -> the keys written in it, active or commented out, in file order."""
    keys: dict[str, list[str]] = {"": []}
    table = ""
    for line in text.splitlines():
        header = re.fullmatch(r"\[([a-z0-9_.]+)\]", line)
        if header:
            table = header.group(1)
            keys[table] = []
            continue
        key = re.match(r"(?:# )?([a-z_]+) = ", line)
        if key:
            keys[table].append(key.group(1))
    return keys


def test_committed_example_is_what_the_script_generates(tmp_path: Path) -> None:
    # Run as an operator would, from another directory, with no PYTHONPATH.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == EXAMPLE.read_text(encoding="utf-8"), (
        "packaging/agent.toml.example is out of date with ctrlagent/config.py; run: " + REGENERATE
    )


def test_script_is_an_executable_python_script() -> None:
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text(encoding="utf-8").startswith("#!/usr/bin/env python3\n")


def test_every_field_is_shown_in_declaration_order() -> None:
    written = _keys_by_table(script.render())
    for table, fields in _sections().items():
        expected = [f.name for f in fields if not _secret(table, f.name)]
        if table == "":
            expected += list(script.EXTRA_KEYS)
        shown = [k for k in written.get(table, []) if k in expected]
        assert sorted(shown) == sorted(expected), "[{}] lacks {}".format(
            table, sorted(set(expected) - set(shown))
        )
        fields_only = [k for k in shown if k not in script.EXTRA_KEYS]
        assert fields_only == [n for n in expected if n not in script.EXTRA_KEYS]
    assert list(written) == list(_sections()), "tables not in declaration order"


def test_secret_never_gets_a_value_line_only_a_pointer_to_the_environment() -> None:
    text = script.render()
    assert not re.search(r"^\s*#?\s*secret\s*=", text, re.MULTILINE)
    assert "secret" not in tomllib.loads(text)
    pointer = [line for line in text.splitlines() if line.startswith("# secret:")]
    assert pointer, "no comment says where the secret comes from"
    block = text[text.index(pointer[0]) :]
    assert "AGENT_SECRET " in block[:300] or "AGENT_SECRET," in block[:300]
    assert "AGENT_SECRET_FILE" in block[:300]


def test_backup_secrets_never_get_a_value_line_only_a_pointer_to_their_file() -> None:
    text = script.render()
    for table, key in (("backups.s3", "secret_key"), ("backups.restic", "password")):
        in_table = _lines_of_table(text.splitlines(), table)
        assert not [line for line in in_table if re.match(r"(# )?{} = ".format(key), line)]
        assert key not in _table(tomllib.loads(text), table)
        pointer = [line for line in in_table if line.startswith("# {}: never".format(key))]
        assert pointer and key + "_file" in pointer[0]


def test_example_loads_to_exactly_the_default_config() -> None:
    environ = {"AGENT_SECRET": "s3cret"}
    loaded = load_config(str(EXAMPLE), environ, {})
    assert loaded == dataclasses.replace(AgentConfig(), secret="s3cret")
    assert loaded == load_config(None, environ, {})


def test_every_active_value_is_the_default_as_toml() -> None:
    parsed = tomllib.loads(script.render())
    defaults = dataclasses.asdict(AgentConfig())
    for table, fields in _sections().items():
        values = _table(parsed, table)
        want = _table(defaults, table)
        for f in fields:
            if f.name in values:
                got = values[f.name]
                expected = want[f.name]
                if isinstance(expected, tuple):
                    expected = list(expected)
                assert got == expected and type(got) is type(expected), (table, f.name)


def test_commented_out_examples_are_values_the_agent_accepts(tmp_path: Path) -> None:
    uncommented = re.sub(r"^# ([a-z_]+ = )", r"\1", script.render(), flags=re.MULTILINE)
    # The S3 secret key file is read at load: give the example a real one (mode 600).
    s3_secret = tmp_path / "s3-secret-key"
    s3_secret.write_text("example-secret\n", encoding="utf-8")
    s3_secret.chmod(0o600)
    uncommented = uncommented.replace(
        script.toml_value(script.EXAMPLES["backups.s3.secret_key_file"]),
        script.toml_value(str(s3_secret)),
    )
    # So is the metrics token file.
    metrics_token = tmp_path / "metrics-token"
    metrics_token.write_text("scrape-token\n", encoding="utf-8")
    metrics_token.chmod(0o600)
    uncommented = uncommented.replace(
        script.toml_value(script.EXAMPLES["metrics.token_file"]),
        script.toml_value(str(metrics_token)),
    )
    toml = tmp_path / "agent.toml"
    toml.write_text(uncommented, encoding="utf-8")
    # The secret is set, so secret_file (an example path) is not read.
    config = load_config(str(toml), {"AGENT_SECRET": "s3cret"}, {})
    assert config.http.tls_cert == script.EXAMPLES["http.tls_cert"]
    assert config.docker.registry_auths == script.EXAMPLES["docker.registry_auths"]
    assert config.secret == "s3cret"
    assert config.backups.s3.secret_key == "example-secret"
    assert config.metrics.token == "scrape-token"
    assert config.backups.schedule.cron == script.EXAMPLES["backups.schedule.cron"]
    assert config.backups.schedule.retain.last == script.EXAMPLES["backups.schedule.retain.last"]


def test_examples_name_only_keys_that_exist_and_are_unset_by_default() -> None:
    defaults = AgentConfig()
    for dotted in script.EXAMPLES:
        if dotted in script.EXTRA_KEYS:
            continue
        value: Any = defaults
        for part in dotted.split("."):
            value = getattr(value, part)
        assert value in ("", {}, None), "{} has a default, show it instead of an example".format(
            dotted
        )


def test_extra_keys_are_exactly_the_loader_keys_outside_the_tree() -> None:
    overrides, _ = script.tap_options((ROOT / "ctrlagent" / "tap.py").read_text())
    tree = {
        (table + "." if table else "") + f.name
        for table, fields in _sections().items()
        for f in fields
    }
    outside = (set(ENVIRONMENT.values()) | set(overrides.values())) - tree
    assert outside == set(script.EXTRA_KEYS)
    assert set(script.EXTRA_AFTER) == set(script.EXTRA_KEYS)


def test_options_read_from_tap_source_are_the_real_options() -> None:
    overrides, flags = script.tap_options((ROOT / "ctrlagent" / "tap.py").read_text())
    assert overrides == Options._OVERRIDES
    assert flags == [flag[0] for flag in Options.optFlags]
    assert set(script.FLAGS) == set(flags), "scripts/config-example FLAGS misses a flag"


@pytest.mark.parametrize("flag", sorted(script.FLAGS))
def test_each_flag_sets_what_the_script_says(flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AGENT_SECRET", "s3cret")
    dotted, value = script.FLAGS[flag]
    options = Options()
    options.parseOptions(["--" + flag])
    got: Any = options.config
    default: Any = AgentConfig()
    for part in dotted.split("."):
        got, default = getattr(got, part), getattr(default, part)
    assert got == value != default


def test_environment_and_options_are_noted_on_their_key() -> None:
    lines = script.render().splitlines()
    overrides, _ = script.tap_options((ROOT / "ctrlagent" / "tap.py").read_text())
    ways = [(env, path) for env, path in ENVIRONMENT.items()]
    ways += [("--" + opt, path) for opt, path in overrides.items()]
    ways += [("--" + flag, path) for flag, (path, _) in script.FLAGS.items()]
    for way, dotted in ways:
        if dotted in script.SECRETS:
            continue
        table, _, key = dotted.rpartition(".")
        in_table = _lines_of_table(lines, table)
        found = [x for x in in_table if re.match(r"(# )?{} = ".format(key), x)]
        assert len(found) == 1, "{} is not shown once in [{}]".format(key, table)
        line = found[0]
        assert re.search(r"  # .*(?<![\w-]){}(?![\w-])".format(re.escape(way)), line), (way, line)


def _lines_of_table(lines: list[str], table: str) -> list[str]:
    out: list[str] = []
    current = ""
    for line in lines:
        header = re.fullmatch(r"\[([a-z0-9_.]+)\]", line)
        if header:
            current = header.group(1)
        elif current == table:
            out.append(line)
    return out


def test_a_new_field_shows_up_with_its_comments(tmp_path: Path) -> None:
    source = textwrap.dedent(
        '''
        from dataclasses import dataclass, field

        @dataclass(frozen=True)
        class Extra:
            """What the extra section is for."""

            plain: int = 3
            # Why this one exists,
            # over two lines.
            explained: str = "x\\"y"

            # Not this one's: a blank line separates it.

            spaced: float = 1.5  # and a note beside it

        @dataclass(frozen=True)
        class Root:
            name: str = "n"
            extra: Extra = field(default_factory=Extra)
        '''
    )
    path = tmp_path / "fake_config.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fake_config", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fake_config"] = module
    try:
        spec.loader.exec_module(module)
        comments = script.field_comments(source)
        lines = script.table(module.Root, "", comments, script.class_docs(source), {})
    finally:
        del sys.modules["fake_config"]
    text = "\n".join(lines)
    assert comments["Extra"]["explained"] == ["Why this one exists,", "over two lines."]
    assert comments["Extra"]["spaced"] == ["and a note beside it"]
    assert "# What the extra section is for.\n[extra]\nplain = 3\n" in text
    assert '# Why this one exists,\n# over two lines.\nexplained = "x\\"y"' in text
    assert "Not this one's" not in text
    assert tomllib.loads(text) == {
        "name": "n",
        "extra": {"plain": 3, "explained": 'x"y', "spaced": 1.5},
    }


def test_packaging_check_parses_the_example() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "packaging" / "check.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_module_is_the_one_the_script_reads() -> None:
    assert Path(script.config.__file__).resolve() == Path(config_module.__file__).resolve()


def _readme_settings() -> dict[str, str]:
    """README.md's configuration part: the table of main settings, and each ``[table]`` item."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    part = text[text.index("## Configuration") : text.index("### Logs")]
    out = {"": part[: part.index("Further TOML settings")]}
    for table in re.findall(r"^- `\[([a-z0-9_.]+)\]`:", part, flags=re.MULTILINE):
        start = part.index("- `[{}]`:".format(table))
        end = part.find("\n- `[", start + 1)
        out[table] = part[start : end if end != -1 else len(part)]
    timeouts = part.index("Every other deadline of the agent is in `[timeouts]`")
    out["timeouts"] = part[timeouts:]
    return out


def test_the_readme_names_every_setting_in_its_section() -> None:
    # The README's list drifted from the code once: every key of every table
    # is named there, under its own table (top-level keys in the main table).
    readme = _readme_settings()
    missing = []
    for table, fields in _sections().items():
        for f in fields:
            shown = "`{}`".format(f.name) in readme.get(table, "") or (
                "`{}.{}`".format(table, f.name) in readme[""]
            )
            if not shown:
                missing.append("{}.{}".format(table, f.name) if table else f.name)
    assert missing == []
