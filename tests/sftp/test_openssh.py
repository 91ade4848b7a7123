"""
OpenSSH's own ``sftp`` client in batch mode (``-b``) against the service:
with a password (through ``sshpass -e``, never on the command line) and
with a key, checking the host key against a known_hosts entry made from the
key file the service generated.
"""

from __future__ import annotations

import os
import shutil

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.conch.ssh import keys
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from tests.sftp.conftest import PASSWORD

NEEDS = "OpenSSH's sftp client and sshpass (apt-get install openssh-client sshpass)"
HAVE_CLIENTS = bool(shutil.which("sftp") and shutil.which("sshpass"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Skipped on a developer's machine without the clients; in CI (CI=true) they
# must be there (.ci/run and scripts/ensure-test-deps install them): fail.
pytestmark = pytest.mark.skipif(not HAVE_CLIENTS and not IN_CI, reason="needs " + NEEDS)


@pytest.fixture(autouse=True)
def _clients_present() -> None:
    if not HAVE_CLIENTS:
        pytest.fail("CI=true and no " + NEEDS)


def _known_hosts(rig, tmp_path) -> str:
    key = keys.Key.fromFile(str(rig.state_dir / "sftp_host_ed25519_key"))
    path = tmp_path / "known_hosts"
    path.write_text("[127.0.0.1]:{} {}\n".format(rig.port, key.public().toString("openssh")
                                                 .decode()))
    return str(path)


async def _sftp(rig, tmp_path, batch: str, *, password: str | None = None,
                identity: str | None = None, cwd=None):
    batch_file = tmp_path / "batch"
    batch_file.write_text(batch)
    # BatchMode=no before -b: sftp's -b turns BatchMode on, and the first value wins.
    args = ["-o", "BatchMode=no", "-b", str(batch_file), "-P", str(rig.port),
            "-o", "StrictHostKeyChecking=yes",
            "-o", "UserKnownHostsFile=" + _known_hosts(rig, tmp_path),
            "-o", "ConnectTimeout=10", "-o", "NumberOfPasswordPrompts=1"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    if identity is not None:
        args += ["-i", identity, "-o", "IdentitiesOnly=yes",
                 "-o", "PasswordAuthentication=no"]
        executable, argv = "/usr/bin/sftp", args
    else:
        args += ["-o", "PubkeyAuthentication=no"]
        env["SSHPASS"] = password or ""
        executable, argv = shutil.which("sshpass"), ["-e", "sftp"] + args
    argv.append("srv1@127.0.0.1")
    out, err, code = await getProcessOutputAndValue(executable, argv, env=env,
                                                   path=str(cwd or tmp_path),
                                                   reactor=reactor)
    return out.decode(errors="replace"), err.decode(errors="replace"), code


@pytest_twisted.ensureDeferred
async def test_openssh_batch_with_a_password(rig, tmp_path):
    await rig.set_login()
    local = tmp_path / "local"
    local.mkdir()
    (local / "world.zip").write_bytes(os.urandom(200_000))
    (rig.root() / "server.properties").write_text("motd=hello\n")
    batch = "\n".join([
        "put -f world.zip",  # -f: fsync@openssh.com after the upload
        "mkdir plugins",
        "rename world.zip plugins/world.zip",
        "chmod 600 plugins/world.zip",
        "ln -s plugins/world.zip latest.zip",
        "get server.properties",
        "get latest.zip back.zip",
        "ls -l",
        "ls -l plugins",
        "mkdir empty",
        "rmdir empty",
        "rm server.properties",
        "",
    ])
    out, err, code = await _sftp(rig, tmp_path, batch, password=PASSWORD, cwd=local)
    assert code == 0, err
    root = rig.root()
    assert (root / "plugins" / "world.zip").read_bytes() == (local / "world.zip").read_bytes()
    assert (local / "back.zip").read_bytes() == (local / "world.zip").read_bytes()
    assert (local / "server.properties").read_text() == "motd=hello\n"
    assert os.stat(root / "plugins" / "world.zip").st_mode & 0o777 == 0o600
    assert os.readlink(root / "latest.zip") == "plugins/world.zip"
    assert not (root / "server.properties").exists() and not (root / "empty").exists()
    assert "world.zip" in out and "-rw-------" in out


@pytest_twisted.ensureDeferred
async def test_openssh_batch_with_a_key(rig, tmp_path):
    private = Ed25519PrivateKey.generate()
    key_file = tmp_path / "id_ed25519"
    key_file.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()))
    key_file.chmod(0o600)
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH).decode()
    await rig.set_login(password=None, publicKeys=[public])
    (rig.root() / "a.txt").write_text("A")
    out, err, code = await _sftp(rig, tmp_path, "ls\nget a.txt\n", identity=str(key_file))
    assert code == 0, err
    assert (tmp_path / "a.txt").read_text() == "A"


@pytest_twisted.ensureDeferred
async def test_openssh_wrong_password_and_escape_attempts_fail(rig, tmp_path):
    await rig.set_login()
    out, err, code = await _sftp(rig, tmp_path, "ls\n", password="not the password")
    assert code != 0
    # A batch that tries to leave: sftp stops at the first failing command.
    os.symlink(str(rig.outside / "canary.txt"), rig.root() / "canary")
    out, err, code = await _sftp(rig, tmp_path, "get canary stolen.txt\n", password=PASSWORD)
    assert code != 0
    assert not (tmp_path / "stolen.txt").exists() or \
        b"CANARY" not in (tmp_path / "stolen.txt").read_bytes()
    assert "ermission denied" in err and "(password" not in err, err


@pytest_twisted.ensureDeferred
async def test_openssh_upload_past_the_quota_reports_a_failure(rig, tmp_path):
    rig.add_server("q", disk_mb=1)
    await rig.set_login("q")
    (tmp_path / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    out, err, code = await _sftp_as(rig, tmp_path, "q", "df\nput big.bin\n")
    assert code != 0
    # statvfs@openssh.com reports the server's limit, not the host's disk (KiB).
    sizes = [line.split()[0] for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert sizes == ["1024"], out
    assert "quota" in err.lower() or "failure" in err.lower()
    assert os.path.getsize(rig.root("q") / "big.bin") <= 1024 * 1024


async def _sftp_as(rig, tmp_path, username, batch):
    batch_file = tmp_path / "batch"
    batch_file.write_text(batch)
    argv = ["-e", "sftp", "-o", "BatchMode=no", "-b", str(batch_file), "-P", str(rig.port),
            "-o", "StrictHostKeyChecking=yes",
            "-o", "UserKnownHostsFile=" + _known_hosts(rig, tmp_path),
            "-o", "PubkeyAuthentication=no", "{}@127.0.0.1".format(username)]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "SSHPASS": PASSWORD}
    out, err, code = await getProcessOutputAndValue(shutil.which("sshpass"), argv, env=env,
                                                   path=str(tmp_path), reactor=reactor)
    return out.decode(errors="replace"), err.decode(errors="replace"), code


@pytest.mark.parametrize("command", [[], ["cat", "/etc/passwd"]], ids=["shell", "exec"])
@pytest_twisted.ensureDeferred
async def test_openssh_ssh_is_told_sftp_only(rig, tmp_path, command):
    await rig.set_login()
    argv = ["-e", "ssh", "-T", "-p", str(rig.port), "-o", "StrictHostKeyChecking=yes",
            "-o", "UserKnownHostsFile=" + _known_hosts(rig, tmp_path),
            "-o", "PubkeyAuthentication=no", "srv1@127.0.0.1", *command]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "SSHPASS": PASSWORD}
    out, err, code = await getProcessOutputAndValue(shutil.which("sshpass"), argv, env=env,
                                                   reactor=reactor)
    assert code == 1
    assert out == b""
    assert b"This account is for SFTP only." in err
