"""
Parse the packaging files and check what an operator relies on.

Run by ``tox -e packaging``.  No systemd or kubectl is needed: the unit is
parsed as INI, the manifests as YAML, the Dockerfile line by line.
"""

from __future__ import annotations

import configparser
import sys
import tomllib
from pathlib import Path

import yaml

HERE = Path(__file__).parent
problems: list[str] = []


def check(condition: bool, what: str) -> None:
    if not condition:
        problems.append(what)


unit = configparser.ConfigParser(strict=False, interpolation=None)
unit.optionxform = str  # type: ignore[assignment,method-assign]
unit.read_string((HERE / "ctrlagent.service").read_text())
for section in ("Unit", "Service", "Install"):
    check(unit.has_section(section), "unit: missing [{}]".format(section))
service = unit["Service"]
check("docker.service" in unit["Unit"].get("After", ""), "unit: After= lacks docker.service")
check("docker.service" in unit["Unit"].get("Requires", ""), "unit: Requires= lacks docker.service")
for key, value in (
    ("Restart", "always"),
    ("NoNewPrivileges", "yes"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("StateDirectory", "ctrlagent"),
    ("User", "ctrlagent"),
    ("SupplementaryGroups", "docker"),
):
    check(service.get(key) == value, "unit: {}={} expected".format(key, value))
check(" ctrlagent " in service.get("ExecStart", ""), "unit: ExecStart does not run the ctrlagent plugin")

compose = yaml.safe_load((HERE / "docker-compose.yml").read_text())
agent = compose["services"]["ctrlagent"]
check("/var/run/docker.sock:/var/run/docker.sock" in agent["volumes"], "compose: no docker socket")
check(any(str(p).endswith("8081") for p in agent["ports"]), "compose: port 8081 not published")

docs = [d for d in yaml.safe_load_all((HERE / "kubernetes.yaml").read_text()) if d]
kinds = {d["kind"] for d in docs}
check("DaemonSet" in kinds, "kubernetes: no DaemonSet")
for d in docs:
    if d["kind"] == "DaemonSet":
        spec = d["spec"]["template"]["spec"]
        container = spec["containers"][0]
        check(container["readinessProbe"]["httpGet"]["path"] == "/health", "kubernetes: probe")
        check(
            any(v.get("hostPath", {}).get("path") == "/var/run/docker.sock" for v in spec["volumes"]),
            "kubernetes: docker socket not mounted",
        )

dockerfile = (HERE / "Dockerfile").read_text().splitlines()
instructions = {line.split()[0] for line in dockerfile if line.strip() and not line.startswith("#")}
for needed in ("FROM", "ENTRYPOINT", "EXPOSE", "HEALTHCHECK"):
    check(needed in instructions, "Dockerfile: no {}".format(needed))

tomllib.loads((HERE / "agent.toml.example").read_text())

if problems:
    sys.exit("packaging problems:\n  " + "\n  ".join(problems))
print("packaging OK: systemd unit, compose file, DaemonSet, Dockerfile, example config")
