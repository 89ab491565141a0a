"""Real services for the tests (PostgreSQL, Slurm, Chromium): present, or a skip that says how to get one.

In CI (``CI=true``, or the service's own ``STABENCH_REQUIRE_*=1``) a missing service is a failure,
never a skip: ``.ci/run`` starts every service the tests use.
"""
from __future__ import annotations

import os
import shutil

import pytest


def in_ci(require_var: str) -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get(require_var) == "1"


def missing(what: str, how: str, require_var: str) -> None:
    """Fail (in CI) or skip (elsewhere) a test that needs ``what``; ``how`` is the command that provides it."""
    message = f"{what} is not available here; `{how}` provides it"
    if in_ci(require_var):
        pytest.fail(f"{message} ({require_var}=1 or CI=true: a missing service is a failure)")
    pytest.skip(message)


def postgres_url() -> str:
    url = os.environ.get("STABENCH_TEST_POSTGRES_URL")
    if not url:
        missing("PostgreSQL (STABENCH_TEST_POSTGRES_URL)", "source tests/postgres.sh", "STABENCH_REQUIRE_POSTGRES")
    return url


def slurm() -> None:
    if os.environ.get("STABENCH_TEST_SLURM") != "1" or not shutil.which("sbatch"):
        missing("a Slurm cluster (STABENCH_TEST_SLURM=1)", "source tests/slurm.sh", "STABENCH_REQUIRE_SLURM")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    missing("headless Chromium", "apt-get install -y chromium", "STABENCH_REQUIRE_CHROMIUM")
    raise AssertionError("unreachable")
