"""NIGHTREC_REQUIRE_SERVICES: a test whose service is missing skips, or fails when CI sets it.

A tiny test file in a temp folder, run by pytest in a subprocess with the suite's conftest as a
plugin: one test with the ``service`` mark (and a fixture that must not run), one that calls
:func:`tests.conftest.require_service`. Both name a service that is not available.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .conftest import REQUIRE_SERVICES_VAR, ROOT

PROBE = '''
import pytest

from tests.conftest import require_service


@pytest.fixture
def expensive(tmp_path_factory):
    (tmp_path_factory.getbasetemp().parent / "fixture-ran").touch()


@pytest.mark.service("postgres", available=False, reason="probe: nothing on 5432")
def test_marked(expensive):
    pass


def test_called():
    require_service("redis", available=False, reason="probe: nothing on 6379")
'''


def _run(tmp_path, required: bool) -> tuple[subprocess.CompletedProcess, bool]:
    folder = tmp_path / ("required" if required else "optional")
    folder.mkdir()
    (folder / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_SERVICES_VAR}
    if required:
        env[REQUIRE_SERVICES_VAR] = "1"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
         "-p", "tests.conftest", "--rootdir", str(folder), "--basetemp", str(folder / "tmp"),
         str(folder / "test_probe.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return out, (folder / "fixture-ran").exists()


def test_missing_service_skips_without_the_variable(tmp_path):
    out, fixture_ran = _run(tmp_path, required=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 skipped" in out.stdout, out.stdout
    # Reported at the probe's tests (as a skipif mark's skip is), not at the helper in conftest.
    for line in ("postgres not available: probe: nothing on 5432",
                 "redis not available: probe: nothing on 6379"):
        assert re.search(r"test_probe\.py:\d+: " + re.escape(line), out.stdout), out.stdout
    assert not fixture_ran


def test_missing_service_fails_under_the_variable(tmp_path):
    out, fixture_ran = _run(tmp_path, required=True)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "skipped" not in out.stdout, out.stdout
    # The mark fails the test in setup (an error), before its fixtures: no stack or DAG run
    # starts for it. The call fails the test where it stands.
    assert "1 failed, 1 error" in out.stdout, out.stdout
    for line in ("postgres required (NIGHTREC_REQUIRE_SERVICES=1) but not available: "
                 "probe: nothing on 5432",
                 "redis required (NIGHTREC_REQUIRE_SERVICES=1) but not available: "
                 "probe: nothing on 6379"):
        assert line in out.stdout, out.stdout
    assert not fixture_ran
