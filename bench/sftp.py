"""
Benchmark of the agent's SFTP server against OpenSSH's own sftp-server.

Both servers run on loopback in their own processes and are driven by the
same client (OpenSSH's ``sftp`` in batch mode, key login) with the same
cipher, MAC and key exchange (``aes128-ctr``, ``hmac-sha2-256``,
``curve25519-sha256``: what both support):

- the agent: ``SftpService`` in a child Python process (this file with
  ``--serve``), its root one server's data directory;
- OpenSSH: a private ``sshd`` (our own config, host key and authorized key in
  a temp directory, ``Subsystem sftp /usr/lib/openssh/sftp-server``) on a
  loopback port, ended by its pid.  Never the system's sshd.

Measured (median of ``--runs``, each minus the time of an empty session):
upload (``put``) and download (``get``) of a ``--size-mib`` file (64 by
default; ``--big`` for 512), and ``ls -1`` of a directory with 10,000 files.
Prints one JSON object with MB/s, seconds and the ratio agent/OpenSSH
(the issue's target: at least 0.5 for throughput).

Run: ``python bench/sftp.py [--big] [--runs N] [--workdir DIR]`` (as root:
sshd needs it; ``apt-get install openssh-server openssh-client``).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

MIB = 1024 * 1024
CIPHER = ["-c", "aes128-ctr", "-o", "MACs=hmac-sha2-256", "-o", "KexAlgorithms=curve25519-sha256"]
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited with {}".format(proc.returncode))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(8).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("no SSH server on port {}".format(port))


# -- the agent's server, in its own process -------------------------------------------


def serve(args: argparse.Namespace) -> None:
    """Run the agent's SFTP service until SIGTERM (the ``--serve`` mode)."""
    from twisted.internet import reactor
    from zope.interface import implementer

    from ctrlagent.errors import ServerNotFound
    from ctrlagent.interfaces import IServerManager, ServerRoot
    from ctrlagent.sftp.config import SftpConfig
    from ctrlagent.sftp.service import SftpService

    @implementer(IServerManager)
    class OneServer:
        """One running server: what the SFTP service asks of the server manager."""

        def resolve(self, server_id: str) -> str:
            if server_id != "bench":
                raise ServerNotFound(server_id)
            return server_id

        def server_root(self, server_id: str) -> ServerRoot:
            return ServerRoot("bench", args.data, None, os.getuid(), os.getgid())

        def status(self, server_id: str) -> dict[str, str]:
            return {"serverId": self.resolve(server_id), "status": "running"}

        def add_listener(self, listener: object) -> None:
            """No events: the bench's server never changes."""

        def remove_listener(self, listener: object) -> None:
            """No events: the bench's server never changes."""

    config = SftpConfig(endpoint="tcp:{}:interface=127.0.0.1".format(args.port),
                        bcrypt_rounds=4)
    service = SftpService(reactor, config, args.state, servers=OneServer())
    service.credentials.load()
    service.credentials.set("bench", {"publicKeys": [open(args.pubkey).read().strip()]})
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))
    reactor.run()


# -- OpenSSH's server ---------------------------------------------------------------------


def start_sshd(work: str, port: int, pubkey: str, root: str) -> subprocess.Popen[bytes]:
    """A private sshd on loopback with OpenSSH's sftp-server."""
    host_key = os.path.join(work, "sshd_host_key")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host_key], check=True)
    auth = os.path.join(work, "authorized_keys")
    shutil.copy(pubkey, auth)
    os.chmod(auth, 0o600)
    config = os.path.join(work, "sshd_config")
    with open(config, "w") as f:
        f.write("\n".join([
            "Port {}".format(port), "ListenAddress 127.0.0.1", "HostKey " + host_key,
            "AuthorizedKeysFile " + auth, "PermitRootLogin prohibit-password",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "StrictModes no", "PidFile none", "Subsystem sftp {} -d {}".format(SFTP_SERVER, root),
            "Ciphers aes128-ctr", "MACs hmac-sha2-256", "KexAlgorithms curve25519-sha256", "",
        ]))
    os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen([shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port, proc)
    return proc


# -- the client ---------------------------------------------------------------------------


def run_batch(work: str, port: int, user: str, key: str, commands: str, cwd: str) -> float:
    """Seconds one ``sftp -b`` session takes."""
    batch = os.path.join(work, "batch")
    with open(batch, "w") as f:
        f.write(commands)
    argv = ["sftp", "-q", "-b", batch, "-P", str(port), "-i", key, *CIPHER,
            "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "{}@127.0.0.1".format(user)]
    start = time.monotonic()
    done = subprocess.run(argv, cwd=cwd, capture_output=True)
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError("sftp failed: {}".format(done.stderr.decode(errors="replace")))
    return elapsed


def measure(work: str, port: int, user: str, key: str, remote: str, local: str,
            size: int, runs: int) -> dict[str, Any]:
    """Medians of put, get and a 10k listing against one server."""
    empty = statistics.median(run_batch(work, port, user, key, "pwd\n", local)
                              for _ in range(3))
    puts, gets, lists = [], [], []
    for _ in range(runs):
        puts.append(run_batch(work, port, user, key, "put big.bin up.bin\n", local) - empty)
        gets.append(run_batch(work, port, user, key, "get up.bin down.bin\n", local) - empty)
        os.unlink(os.path.join(local, "down.bin"))
        lists.append(run_batch(work, port, user, key, "ls -1 many\n", local) - empty)
        os.unlink(os.path.join(remote, "up.bin"))
    put_s, get_s, list_s = (statistics.median(x) for x in (puts, gets, lists))
    return {"upload_MBps": round(size / MIB / put_s, 1),
            "download_MBps": round(size / MIB / get_s, 1),
            "list_10k_s": round(list_s, 3), "session_s": round(empty, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", action="store_true", help="512 MiB instead of --size-mib")
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--pubkey", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    size = (512 if args.big else args.size_mib) * MIB
    work = tempfile.mkdtemp(prefix="sftp-bench-", dir=args.workdir)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        key = os.path.join(work, "client_key")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
        local = os.path.join(work, "local")
        os.makedirs(local)
        with open(os.path.join(local, "big.bin"), "wb") as f:
            for _ in range(size // MIB):
                f.write(os.urandom(MIB))
        roots = {}
        for name in ("agent", "openssh"):
            root = os.path.join(work, name + "-root")
            os.makedirs(os.path.join(root, "many"))
            for i in range(10_000):
                open(os.path.join(root, "many", "file{:05d}.dat".format(i)), "wb").close()
            roots[name] = root
        agent_port, sshd_port = _free_port(), _free_port()
        state = os.path.join(work, "state")
        os.makedirs(state)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
             env.get("PYTHONPATH", "")])
        agent = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", "--port", str(agent_port),
             "--data", roots["agent"], "--state", state, "--pubkey", key + ".pub"], env=env)
        procs.append(agent)
        _wait_port(agent_port, agent)
        procs.append(start_sshd(work, sshd_port, key + ".pub", roots["openssh"]))
        user = pwd.getpwuid(os.getuid()).pw_name
        agent_fig = measure(work, agent_port, "bench", key, roots["agent"], local, size,
                            args.runs)
        openssh_fig = measure(work, sshd_port, user, key, roots["openssh"], local, size,
                              args.runs)
        print(json.dumps({
            "size_mib": size // MIB, "runs": args.runs, "cipher": "aes128-ctr/hmac-sha2-256",
            "agent": agent_fig, "openssh": openssh_fig,
            "ratio_upload": round(agent_fig["upload_MBps"] / openssh_fig["upload_MBps"], 2),
            "ratio_download": round(agent_fig["download_MBps"] / openssh_fig["download_MBps"],
                                    2),
            "ratio_list_time": round(agent_fig["list_10k_s"] / max(openssh_fig["list_10k_s"],
                                                                   1e-6), 2),
        }, indent=1))
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
