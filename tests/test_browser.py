"""A real browser: JupyterLab on localhost, the quickstart notebook run in headless Chromium.

Needs Debian's ``chromium`` (``make browser-deps``; /usr/bin/chromium, or ``PROXYCLIP_CHROMIUM=PATH``) and
the Python ``playwright`` package driving that system browser (no browser download). Without the browser
the test is skipped with one reason line, except in CI (``CI=true``), where a missing browser fails it.
Select or skip with ``-m browser`` / ``-m "not browser"``. The screenshot is saved under the test's tmp_path.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from proxyclip.methods import METHODS, get_method
from proxyclip.resolve import postprocess_presets

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHROMIUM = os.environ.get("PROXYCLIP_CHROMIUM", "/usr/bin/chromium")
MISSING = f"chromium not found ({CHROMIUM}): make browser-deps"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
TOKEN = "proxyclip-browser-test"

pytestmark = pytest.mark.browser


def preset_function(preset: str):
    """The post-process a preset of conf/postprocess runs."""
    from omegaconf import OmegaConf

    from proxyclip.config import CONF_DIR
    from proxyclip.postprocess import get_postprocess

    return get_postprocess(OmegaConf.load(CONF_DIR / "postprocess" / f"{preset}.yaml").name)


def expected_controls(method: str, preset: str) -> dict:
    """The controls the explorer must show, from the declarations: a slider per number with a declared
    slider range, a checkbox per switch, a dropdown per choice (after the sample, CLIP, VFM, method and
    post-process dropdowns), a text box per list; then the patch sliders, the affinity-stages and the
    mask-proposals checkboxes."""
    knobs = get_method(method).all_knobs + preset_function(preset).knobs
    return {"sliders": [k.name for k in knobs if k.kind in ("float", "int") and k.slider] + ["patch x", "patch y", "CLIP block"],
            "checkboxes": [k.name for k in knobs if k.kind == "bool"] + ["affinity stages", "mask proposals over the image"],
            "dropdowns": ["sample image", "CLIP", "VFM", "method"] + [k.name for k in get_method(method).all_knobs
                                                                     if k.kind == "choice"]
            + ["post-process"] + [k.name for k in preset_function(preset).knobs if k.kind == "choice"],
            "texts": [k.name for k in knobs if k.kind == "ints" or (k.kind in ("float", "int") and not k.slider)]}


def shown_controls(page) -> dict:
    def labels(selector: str, label: str = ".widget-label"):
        return [e.locator(label).first.inner_text().strip()
                for e in page.locator(f".proxyclip-explorer {selector}").all()]

    texts = [t for t in labels(".widget-text, .widget-inline-hbox:has(input[type=number])") if t != "or a path"]
    boxes = [e.inner_text().replace("\u200b", "").strip()
             for e in page.locator(".proxyclip-explorer .widget-checkbox").all()]
    return {"sliders": labels(".widget-slider"), "checkboxes": [t.split(" (")[0] for t in boxes],
            "dropdowns": labels(".widget-dropdown"), "texts": texts}


def dropdown(page, label: str):
    return page.locator(".proxyclip-explorer .widget-dropdown").filter(
        has=page.locator(".widget-label", has_text=re.compile(f"^{re.escape(label)}$"))).locator("select")


def slider(page, label: str):
    return page.locator(".proxyclip-explorer .widget-slider").filter(
        has=page.locator(".widget-label", has_text=re.compile(f"^{re.escape(label)}$")))


def wait_for_status(page, text: str) -> None:
    page.wait_for_function(
        "(t) => [...document.querySelectorAll('.proxyclip-explorer .widget-html')].some(e => e.innerText.includes(t))",
        arg=text, timeout=60_000)


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
            # the controls are the declared knobs of the method and post-process shown
            method = dropdown(page, "method").input_value()
            preset = dropdown(page, "post-process").input_value()
            expected = expected_controls(method, preset)
            assert shown_controls(page) == expected
            status = page.locator(".proxyclip-explorer .widget-html").last
            assert "encodes 1, decodes 1" in status.inner_text()

            # move the method's first slider through its readout: the kernel decodes again, nothing re-encodes
            knob = next(k for k in get_method(method).all_knobs if k.slider is not None and k.kind == "float")
            lo, hi, step = knob.slider
            value = round(lo + step * round((hi - lo) / 2 / step), 6)
            readout = slider(page, knob.name).locator(".widget-readout")
            readout.click()
            page.keyboard.press("Control+A")
            page.keyboard.type(str(value))
            page.keyboard.press("Enter")
            wait_for_status(page, "encodes 1, decodes 2")
            assert float(readout.inner_text()) == pytest.approx(value)

            # click on the left part of the segmentation figure: the patch moves left of the centre (x = 40)
            patch_x = slider(page, "patch x").locator(".widget-readout")
            assert patch_x.inner_text().strip() == "40"
            seg_img = page.locator(".proxyclip-explorer img").first
            box = seg_img.bounding_box()
            src_before = seg_img.get_attribute("src")
            seg_img.click(position={"x": box["width"] * 0.15, "y": box["height"] * 0.4})
            page.wait_for_function("(el) => Number(el.innerText) < 30", arg=patch_x.element_handle(), timeout=30_000)
            page.wait_for_function(  # the figure is redrawn with the marker at the new point
                "(before) => document.querySelector('.proxyclip-explorer img').getAttribute('src') !== before",
                arg=src_before, timeout=30_000)

            # another method from the method dropdown: a decode on the same encode, its own knobs' controls
            other = next(m for m in METHODS if m != method and not METHODS[m].needs_vfm)
            dropdown(page, "method").select_option(other)
            wait_for_status(page, "encodes 1, decodes 3")
            page.wait_for_function(
                "(n) => document.querySelectorAll('.proxyclip-explorer .widget-slider').length === n",
                arg=len(expected_controls(other, preset)["sliders"]), timeout=30_000)
            assert shown_controls(page) == expected_controls(other, preset)

            # another post-process preset: its settings' controls appear, one more decode
            preset = next(p for p in postprocess_presets() if preset_function(p).knobs)
            dropdown(page, "post-process").select_option(preset)
            wait_for_status(page, "encodes 1, decodes 4")
            assert shown_controls(page) == expected_controls(other, preset)

            # no cell raised
            assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").count() == 0
            explorer.scroll_into_view_if_needed()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            context.close()
    assert shot.stat().st_size > 10_000
    assert not errors, errors
