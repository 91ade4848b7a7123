"""Packaging for ctrlagent, the Ctrl-Alt-Play node agent."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (HERE / "ctrlagent" / "__init__.py").read_text()
).group(1)

setup(
    name="ctrlagent",
    version=VERSION,
    description="Ctrl-Alt-Play node agent: runs game servers in Docker for the Panel",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["ctrlagent", "ctrlagent.*"]) + ["twisted.plugins"],
    include_package_data=True,
    install_requires=[
        # conch: the SFTP server (ctrlagent/sftp); bcrypt hashes its passwords.
        "twisted[tls,conch]>=25.5",
        "bcrypt>=4",
        "autobahn>=23.1",
        "treq>=23.11",
        "klein>=23.5",
        "service-identity>=21.1",
        "attrs>=23.1",
        "hyperlink>=21.0",
        # Backups (ctrlagent/backups): zstd archives, .pteroignore rules,
        # cron schedules, the S3 driver.
        "zstandard>=0.22",
        "pathspec>=0.12",
        "croniter>=2.0",
        "boto3>=1.34",
        # GET /metrics (ctrlagent/metrics, ctrlagent/api/metrics.py).
        "prometheus-client>=0.17",
        # Every answer's and frame's JSON (ctrlagent/wire/json.py).
        "orjson>=3.9",
    ],
    # The operator's command on the node (ctrlagent/cli): plain stdlib, starts fast.
    entry_points={"console_scripts": ["ctrlagent = ctrlagent.cli.main:main"]},
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "pytest-timeout>=2.2",
            "hypothesis>=6.100",
            "openapi-spec-validator>=0.7",
            "paramiko>=3",
            # A real S3 on loopback for the backup tests (tests/backups/s3rig.py).
            "moto[server]>=5",
        ],
    },
    zip_safe=False,
)
