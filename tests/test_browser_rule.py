"""The browser test's rule for a missing Chromium: skip with one reason line, but fail in CI (CI=true).

Runs pytest on tests/test_browser.py in a subprocess with PROXYCLIP_CHROMIUM pointing nowhere, so no
browser or JupyterLab is ever started here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_browser_test(ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PROXYCLIP_CHROMIUM="/nonexistent/chromium", PYTHONPATH=str(ROOT))
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_browser.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_missing_chromium_skips_with_its_reason_outside_ci():
    out = run_browser_test(ci=None)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 skipped" in out.stdout and "failed" not in out.stdout
    reasons = [line for line in out.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(reasons) == 1 and "chromium not found (/nonexistent/chromium): make browser-deps" in reasons[0]
    assert "JupyterLab" not in out.stdout  # the server fixture never started


def test_missing_chromium_fails_in_ci():
    out = run_browser_test(ci="true")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "skipped" not in out.stdout
    assert "1 error" in out.stdout or "1 failed" in out.stdout
    assert "CI=true: a missing browser is a failure" in out.stdout
