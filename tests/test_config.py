"""Configuration: precedence, validation, secret files, and the twistd options."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import LogLevel, jsonFileLogObserver

from ctrlagent.config import AgentConfig, load_config, read_secret_file
from ctrlagent.errors import ConfigInvalid
from ctrlagent.tap import Options


def test_defaults_match_the_protocol() -> None:
    config = load_config(None, {}, {"development": True})
    # No WebSocket link unless one is configured: the current Panel has none
    # and drives agents over HTTP (PROTOCOL.md section 0).
    assert config.panel.url == "" and not config.panel.dials()
    assert config.node_id == "node-1"
    assert config.http.port == 8081
    assert config.docker.host == "unix:///var/run/docker.sock"
    assert config.panel.heartbeat_interval == 30.0
    assert config.http.endpoint_description() == "tcp:8081:interface=0.0.0.0"


def test_environment_overrides_file_and_options_override_environment(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text(
        'node_id = "from-file"\nsecret = "s"\n[http]\nport = 9000\n[panel]\nurl = "ws://file:1/"\n'
    )
    env = {"NODE_ID": "from-env", "HEALTH_PORT": "9100"}
    config = load_config(str(toml), env, {"http.port": 9200})
    assert config.node_id == "from-env"
    assert config.http.port == 9200
    assert config.panel.url == "ws://file:1/"
    assert config.secret == "s"


def test_a_configured_panel_websocket_url_keeps_its_link(tmp_path: Path) -> None:
    # An operator's existing config or environment naming the link still gets it.
    toml = tmp_path / "agent.toml"
    toml.write_text('secret = "s"\n[panel]\nurl = "wss://panel.example.com:8080"\n')
    assert load_config(str(toml), {}, {}).panel.dials()
    env = {"AGENT_SECRET": "s", "PANEL_URL": "ws://old-panel:8080"}
    assert load_config(None, env, {}).panel.dials()
    assert not load_config(None, {**env, "CTRLAGENT_PANEL_ENABLED": "0"}, {}).panel.dials()
    assert not load_config(None, {**env, "PANEL_URL": ""}, {}).panel.dials()


def test_missing_secret_refuses_to_start_unless_development() -> None:
    with pytest.raises(ConfigInvalid, match="AGENT_SECRET"):
        load_config(None, {}, {})
    assert load_config(None, {"CTRLAGENT_DEVELOPMENT": "1"}, {}).development is True


def test_world_readable_secret_file_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigInvalid, match="world-readable"):
        load_config(None, {"AGENT_SECRET_FILE": str(secret)}, {})
    secret.chmod(0o600)
    assert read_secret_file(str(secret)) == "hunter2"
    assert load_config(None, {"AGENT_SECRET_FILE": str(secret)}, {}).secret == "hunter2"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"HEALTH_PORT": "abc"}, "http.port: expected an integer"),
        ({"HEALTH_PORT": "0"}, "not a TCP port"),
        ({"PANEL_URL": "http://panel"}, "ws:// or wss://"),
        ({"DOCKER_HOST": "/var/run/docker.sock"}, "must start with unix://"),
        ({"CTRLAGENT_STATE_DIR": "relative/dir"}, "absolute path"),
        ({"CTRLAGENT_PANEL_ENABLED": "maybe"}, "expected a boolean"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigInvalid, match=message):
        load_config(None, {"AGENT_SECRET": "s", **env}, {})


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text('secret = "s"\n[http]\nprot = 1\n')
    with pytest.raises(ConfigInvalid, match="http.prot"):
        load_config(str(toml), {}, {})


def test_secret_never_appears_in_repr() -> None:
    config = load_config(None, {"AGENT_SECRET": "topsecret-value"}, {})
    assert "topsecret-value" not in repr(config)
    assert "topsecret-value" not in str(config)


@given(st.text(min_size=1, max_size=40).filter(lambda s: s.strip() != ""))
def test_any_node_id_round_trips(node_id: str) -> None:
    config = load_config(None, {"AGENT_SECRET": "s", "NODE_ID": node_id}, {})
    assert config.node_id == node_id


def test_tls_endpoint_description_escapes_paths() -> None:
    config = load_config(
        None, {"AGENT_SECRET": "s"}, {"http.tls_cert": "/etc/a:b/cert.pem", "http.port": 8443}
    )
    desc = config.http.endpoint_description()
    assert desc.startswith("ssl:8443:")
    assert "certKey=/etc/a\\:b/cert.pem" in desc


def test_options_build_config_from_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "environ", {"AGENT_SECRET": "s"})
    options = Options()
    options.parseOptions(["--port", "9999", "--node-id", "n-7", "--no-panel"])
    assert isinstance(options.config, AgentConfig)
    assert options.config.http.port == 9999
    assert options.config.node_id == "n-7"
    assert options.config.panel.enabled is False


def test_bad_option_value_exits_non_zero_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "environ", {"AGENT_SECRET": "s"})
    with pytest.raises(SystemExit) as exit_info:
        Options().parseOptions(["--port", "70000"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "http.port 70000" in err


def test_json_observer_redacts_secret_fields() -> None:
    from ctrlagent.logs import _Redacting

    out = io.StringIO()
    observer = _Redacting(jsonFileLogObserver(out, recordSeparator=""))
    observer(
        {
            "log_format": "x",
            "log_level": LogLevel.info,
            "secret": "abc",
            "Authorization": "Bearer abc",
        }
    )
    line = json.loads(out.getvalue())
    assert "abc" not in out.getvalue()
    assert line["secret"] == "<redacted>"


def test_packaged_example_config_loads() -> None:
    example = Path(__file__).parent.parent / "packaging" / "agent.toml.example"
    config = load_config(str(example), {"AGENT_SECRET": "s"}, {})
    assert config.http.port == 8081


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("http.max_connections", 8, "max_connections must be at least 16"),
        ("http.header_timeout", 0, "header_timeout must be between"),
        ("http.header_timeout", float("nan"), "header_timeout must be between"),
        ("http.idle_timeout", float("inf"), "idle_timeout must be between"),
        ("http.idle_timeout", -1, "idle_timeout must be between"),
        ("panel.max_in_flight", 0, "max_in_flight must be at least 1"),
        ("panel.max_held_bytes", 1000, "max_held_bytes must be at least 65536"),
    ],
)
def test_connection_guards_refuse_unusable_values(setting: str, value: float, message: str) -> None:
    with pytest.raises(ConfigInvalid, match=message):
        load_config(None, {"AGENT_SECRET": "s"}, {setting: value})


def test_connection_guards_have_safe_defaults(tmp_path: Path) -> None:
    config = load_config(None, {"AGENT_SECRET": "s"}, {})
    assert config.http.max_connections == 1024
    assert 0 < config.http.header_timeout <= 10
    toml = tmp_path / "agent.toml"
    toml.write_text('secret = "s"\n[http]\nmax_connections = 4096\nheader_timeout = 5\n')
    config = load_config(str(toml), {}, {})
    assert (config.http.max_connections, config.http.header_timeout) == (4096, 5.0)


@pytest.mark.parametrize("value", [-0.01, 1.5, float("nan"), float("inf")])
def test_the_stream_read_interval_is_refused_outside_a_second(value: float) -> None:
    with pytest.raises(ConfigInvalid, match="docker.stream_read_interval must be between 0 and 1"):
        load_config(None, {"AGENT_SECRET": "s"}, {"docker.stream_read_interval": value})
    assert load_config(None, {"AGENT_SECRET": "s"}, {}).docker.stream_read_interval == 0.025
    config = load_config(None, {"AGENT_SECRET": "s"}, {"docker.stream_read_interval": 0})
    assert config.docker.stream_read_interval == 0  # every stream read as its data comes


def test_every_deadline_has_todays_default_and_reads_from_the_timeouts_table(
    tmp_path: Path,
) -> None:
    timeouts = load_config(None, {"AGENT_SECRET": "s"}, {}).timeouts
    assert (
        timeouts.command_answer,
        timeouts.command_margin,
        timeouts.http_drain,
        timeouts.engine_ping,
        timeouts.engine_ping_cache,
    ) == (25.0, 2.0, 10.0, 3.0, 1.5)
    # Every key of the table, each with the constant the agent had before it.
    assert dataclasses.asdict(timeouts) == {
        "command_answer": 25.0,
        "command_margin": 2.0,
        "http_drain": 10.0,
        "engine_ping": 3.0,
        "engine_ping_cache": 1.5,
        "kill_grace": 10.0,
        "exit_drain": 2.0,
        "install_log_drain": 5.0,
        "events_retry": 0.25,
        "events_retry_max": 2.0,
        "console_reply_wait": 1.0,
        "host_info": 5.0,
    }
    toml = tmp_path / "agent.toml"
    toml.write_text('secret = "s"\n[timeouts]\ncommand_answer = 20\nengine_ping_cache = 0\n')
    timeouts = load_config(str(toml), {}, {}).timeouts
    assert (timeouts.command_answer, timeouts.engine_ping_cache) == (20.0, 0.0)


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("timeouts.command_answer", 0, "timeouts.command_answer must be more than 0"),
        ("timeouts.command_answer", float("nan"), "timeouts.command_answer must be more than 0"),
        ("timeouts.http_drain", -1, "timeouts.http_drain must be more than 0"),
        ("timeouts.engine_ping", float("inf"), "timeouts.engine_ping must be more than 0"),
        ("timeouts.command_margin", -0.5, "timeouts.command_margin must be between 0"),
        ("timeouts.engine_ping_cache", 4000, "timeouts.engine_ping_cache must be between 0"),
        ("timeouts.command_answer", "soon", "timeouts.command_answer: expected a number"),
        ("timeouts.answer", 1, "unknown configuration key 'timeouts.answer'"),
    ],
)
def test_unusable_deadlines_are_refused_naming_the_setting(
    setting: str, value: object, message: str
) -> None:
    with pytest.raises(ConfigInvalid, match=message):
        load_config(None, {"AGENT_SECRET": "s"}, {setting: value})


def test_sftp_is_a_section_of_the_tree_set_by_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[sftp]\nport = 2200\nbackend = "local"\n')
    config = load_config(str(path), {}, {"development": True})
    assert config.sftp.enabled is True and config.sftp.port == 2200
    assert config.sftp.endpoint_description() == "tcp:2200:interface=0.0.0.0"
    env = {
        "CTRLAGENT_SFTP_ENABLED": "false",
        "CTRLAGENT_SFTP_PORT": "2300",
        "CTRLAGENT_SFTP_ENDPOINT": "tcp:0:interface=127.0.0.1",
    }
    config = load_config(str(path), env, {"development": True})
    assert config.sftp.enabled is False and config.sftp.port == 2300
    assert config.sftp.endpoint_description() == "tcp:0:interface=127.0.0.1"


@pytest.mark.parametrize(
    "dotted, value, needle",
    [
        ("sftp.port", 70000, "sftp.port"),
        ("sftp.backend", "ldap", "sftp.backend"),
        ("sftp.host_key", "relative/key", "sftp.host_key"),
        ("sftp.nope", 1, "unknown configuration key 'sftp.nope'"),
        ("sftp.throttle_max", float("nan"), "sftp.throttle_max"),
        # int(True) is 1: a boolean is never a port (nor any other number).
        ("sftp.port", True, "sftp.port: expected an integer"),
        ("http.port", True, "http.port: expected an integer"),
        ("files.disk_usage_ttl", False, "files.disk_usage_ttl: expected a number"),
    ],
)
def test_bad_sftp_and_boolean_numbers_are_refused_by_load_config(
    dotted: str, value: object, needle: str
) -> None:
    with pytest.raises(ConfigInvalid) as e:
        load_config(None, {}, {"development": True, dotted: value})
    assert needle in str(e.value)


def test_backups_is_a_section_of_the_tree_read_from_the_file(tmp_path: Path) -> None:
    secret = tmp_path / "s3-secret"
    secret.write_text("very-secret-key\n")
    secret.chmod(0o600)
    toml = tmp_path / "agent.toml"
    toml.write_text(
        'state_dir = "{state}"\n[backups]\ndriver = "s3"\nconcurrency = 3\n'
        '[backups.s3]\nbucket = "b"\nsecret_key_file = "{secret}"\n'
        '[backups.schedule]\ncron = "0 4 * * *"\nretain = 5\n'.format(
            state=tmp_path, secret=secret
        )
    )
    config = load_config(str(toml), {}, {"development": True})
    assert config.backups.driver == "s3"
    assert config.backups.concurrency == 3
    assert config.backups.s3.secret_key == "very-secret-key"
    assert config.backups.schedule.retain.last == 5
    # Without a directory, local archives go under the state directory.
    assert config.backups.directory == ""
    assert config.backups.directory_path(config.state_dir) == str(tmp_path / "backups")
    # The secret never shows through repr, of the section or of the tree.
    assert "very-secret-key" not in repr(config.backups)
    assert "very-secret-key" not in repr(config)


def test_backups_directory_follows_the_state_directory_by_default() -> None:
    config = load_config(None, {"CTRLAGENT_STATE_DIR": "/srv/agent"}, {"development": True})
    assert config.backups.directory_path(config.state_dir) == "/srv/agent/backups"
    chosen = dataclasses.replace(config.backups, directory="/srv/archives")
    assert chosen.directory_path(config.state_dir) == "/srv/archives"
    assert load_config(None, {}, {"development": True}).backups == AgentConfig().backups


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[backups]\ndriver = "tape"\n', "backups.driver must be one of local, s3, restic"),
        ('[backups]\ndriver = "s3"\n', "backups.s3.bucket is required for the s3 driver"),
        ("[backups]\nconcurrency = 0\n", "backups.concurrency must be between 1 and 64"),
        ('[backups]\nnope = 1\n', "unknown setting backups.nope"),
        ('[backups.schedule]\ncron = "every day"\n', "backups.schedule.cron is not a valid"),
    ],
)
def test_bad_backup_settings_are_refused_by_load_config(
    tmp_path: Path, toml: str, message: str
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(toml)
    with pytest.raises(ConfigInvalid, match=message):
        load_config(str(path), {}, {"development": True})


def test_validate_refuses_a_backups_tree_built_in_code() -> None:
    from ctrlagent.config import validate

    base = AgentConfig(development=True)
    for backups, message in (
        (dataclasses.replace(base.backups, directory="relative"), "must be an absolute path"),
        (dataclasses.replace(base.backups, driver="restic"), "backups.restic.repository"),
        (dataclasses.replace(base.backups, compression_level=42), "compression_level"),
    ):
        with pytest.raises(ConfigInvalid, match=message):
            validate(dataclasses.replace(base, backups=backups))
