"""A real browser: JupyterLab on localhost, the quickstart notebook run in headless Chromium.

Needs Debian's ``chromium`` (``make browser-deps``; /usr/bin/chromium, or ``PROXYCLIP_CHROMIUM=PATH``) and
the Python ``playwright`` package driving that system browser (no browser download). Without the browser
the test is skipped with one reason line, except in CI (``CI=true``), where a missing browser fails it.
Select or skip with ``-m browser`` / ``-m "not browser"``. The screenshot is saved under the test's tmp_path.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHROMIUM = os.environ.get("PROXYCLIP_CHROMIUM", "/usr/bin/chromium")
MISSING = f"chromium not found ({CHROMIUM}): make browser-deps"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
TOKEN = "proxyclip-browser-test"

pytestmark = pytest.mark.browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture
def chromium() -> str:
    """The browser's path; missing: skip with one reason line, or fail in CI (the test must never stop running there)."""
    if not Path(CHROMIUM).exists():
        if in_ci():
            pytest.fail(f"{MISSING} (CI=true: a missing browser is a failure)", pytrace=False)
        pytest.skip(MISSING)
    return CHROMIUM


@pytest.fixture
def jupyterlab(chromium, tmp_path):
    """A JupyterLab server on 127.0.0.1 serving a copy of the quickstart notebook (so nothing is saved into the repo)."""
    root = tmp_path / "lab"
    root.mkdir()
    for name in ("01_quickstart.ipynb", "_workbench.py"):
        shutil.copy(NOTEBOOKS / name, root / name)
    port = free_port()
    env = dict(os.environ, PROXYCLIP_SMOKE="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               JUPYTER_CONFIG_DIR=str(tmp_path / "jconfig"), JUPYTER_RUNTIME_DIR=str(tmp_path / "jruntime"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "jsettings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "jworkspaces"))
    env.pop("MPLBACKEND", None)
    log = open(tmp_path / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={TOKEN}", "--ServerApp.password=",
         "--LabApp.expose_app_in_browser=True", "--LabApp.extension_manager=readonly",
         "--LabApp.news_url=None", "--allow-root"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"JupyterLab did not start:\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_quickstart_runs_in_jupyterlab_and_the_explorer_renders(chromium, jupyterlab, tmp_path):
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "explorer.png"
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1500, "height": 1000})
        try:
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{jupyterlab}/lab/tree/01_quickstart.ipynb?token={TOKEN}", timeout=60_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.commands.hasCommand('notebook:run-all-cells')",
                                   timeout=60_000)
            # wait for the kernel, then run every cell
            page.wait_for_function(
                "() => { const w = window.jupyterapp.shell.currentWidget;"
                " return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
                " && w.sessionContext.session.kernel.connectionStatus === 'connected'; }", timeout=60_000)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")

            explorer = page.wait_for_selector(".proxyclip-explorer", timeout=240_000)
            # the explorer's controls and both rendered figures
            page.wait_for_function(
                "() => { const imgs = document.querySelectorAll('.proxyclip-explorer img');"
                " return imgs.length === 2 && [...imgs].every(i => i.complete && i.naturalWidth > 100); }",
                timeout=60_000)
            sliders = page.locator(".proxyclip-explorer .widget-slider")
            assert sliders.count() == 6  # gamma, beta, temperature, prob_thd, patch x, patch y
            labels = page.locator(".proxyclip-explorer .widget-label").all_inner_texts()
            for name in ("gamma (scale)", "beta (shift)", "logit temp. 1/s", "prob_thd", "patch x", "patch y"):
                assert name in labels
            assert page.locator(".proxyclip-explorer .widget-dropdown select").count() == 4  # sample, CLIP, VFM, method
            status = page.locator(".proxyclip-explorer .widget-html").last
            assert "encodes 1, decodes 1" in status.inner_text()

            # move the gamma slider through its readout: the kernel decodes again, nothing re-encodes
            readout = page.locator(".proxyclip-explorer .widget-slider").first.locator(".widget-readout")
            readout.click()
            page.keyboard.press("Control+A")
            page.keyboard.type("5.0")
            page.keyboard.press("Enter")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.proxyclip-explorer .widget-html')]"
                ".some(e => e.innerText.includes('encodes 1, decodes 2'))", timeout=60_000)
            assert readout.inner_text().strip() == "5.00"

            # click on the left part of the segmentation figure: the patch moves left of the centre (x = 40)
            patch_x = page.locator(".proxyclip-explorer .widget-slider").nth(4)
            assert "patch x" in patch_x.inner_text() and patch_x.locator(".widget-readout").inner_text().strip() == "40"
            seg_img = page.locator(".proxyclip-explorer img").first
            box = seg_img.bounding_box()
            src_before = seg_img.get_attribute("src")
            seg_img.click(position={"x": box["width"] * 0.15, "y": box["height"] * 0.4})
            page.wait_for_function(
                "() => { const r = document.querySelectorAll('.proxyclip-explorer .widget-slider')[4]"
                ".querySelector('.widget-readout'); return r && Number(r.innerText) < 30; }", timeout=30_000)
            page.wait_for_function(  # the figure is redrawn with the marker at the new point
                "(before) => document.querySelector('.proxyclip-explorer img').getAttribute('src') !== before",
                arg=src_before, timeout=30_000)

            # another method from the method dropdown: a decode on the same encode
            page.locator(".proxyclip-explorer .widget-dropdown select").nth(3).select_option("sclip")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.proxyclip-explorer .widget-html')]"
                ".some(e => e.innerText.includes('encodes 1, decodes 3'))", timeout=60_000)

            # no cell raised
            assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").count() == 0
            explorer.scroll_into_view_if_needed()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            context.close()
    assert shot.stat().st_size > 10_000
    assert not errors, errors
