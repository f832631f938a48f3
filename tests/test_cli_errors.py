"""Every config-level mistake is one ``error:`` line naming the key, with exit code 2, on every Hydra
entry point; unusable folders too; a multirun with a failing job exits 2 naming it."""

import importlib
import json
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from fixtures_eval import PYTHON, REPO, subprocess_env
from PIL import Image

from proxyclip.config import compose_config

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
HYDRA_APPS = {name: t for name, t in SCRIPTS.items()
              if "run_app(" in importlib.util.find_spec(t.split(":")[0]).loader.get_source(t.split(":")[0])}
CONFIG_NAMES = {"proxyclip-segment": "segment", "proxyclip-eval": "eval", "proxyclip-sweep": "sweep"}

# (override, the key the error must name, a word of what was expected / the valid choices)
MISTAKES = [
    ("experiment=tinyy", "experiment=tinyy", "tiny"),
    ("method.gama=2", "method.gama", "gamma"),
    ("method.beta=abc", "method.beta", "number"),
    ("+method.gama=2", "method.gama", "gamma"),
    ("+foo=1", "foo", "method"),
    ("method=proxyclip_schema", "method=proxyclip_schema", "naclip"),
    ("vfm=_fragment", "vfm=_fragment", "dino_vitb8"),
]


def _in_process(monkeypatch, capsys, target: str, *args: str):
    module, func = target.split(":")
    monkeypatch.setattr(sys, "argv", ["prog", *args])
    with pytest.raises(SystemExit) as e:
        getattr(importlib.import_module(module), func)()
    return e.value.code, capsys.readouterr().err


def _dataset_args(name: str) -> list:
    return [] if name == "proxyclip-segment" else ["dataset=voc21"]


def _assert_one_line(err: str, prog: str, *words: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("name", sorted(HYDRA_APPS))
@pytest.mark.parametrize("override,key,expected", MISTAKES)
def test_config_mistake_is_one_line(name, override, key, expected, monkeypatch, capsys, tmp_path):
    code, err = _in_process(monkeypatch, capsys, HYDRA_APPS[name], *_dataset_args(name), "experiment=tiny",
                            override, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2
    _assert_one_line(err, name, key, expected)
    assert not (tmp_path / "run").exists()  # refused before Hydra made a run directory


@pytest.mark.parametrize("name", sorted(HYDRA_APPS))
def test_list_without_brackets_is_one_line(name, monkeypatch, capsys):
    cfg = compose_config(CONFIG_NAMES[name], _dataset_args(name))
    key = "classes" if "classes" in cfg else "dataset.background"  # a list setting of this command
    code, err = _in_process(monkeypatch, capsys, HYDRA_APPS[name], *_dataset_args(name), f"{key}=sky")
    assert code == 2
    _assert_one_line(err, name, f"{key}=sky", "list in brackets")


@pytest.mark.parametrize("name", sorted(HYDRA_APPS))
def test_missing_dataset_is_one_line(name, monkeypatch, capsys):
    if name == "proxyclip-segment":
        return  # segment takes no dataset (its own test: a dataset= override is refused below)
    code, err = _in_process(monkeypatch, capsys, HYDRA_APPS[name], "experiment=tiny")
    assert code == 2
    _assert_one_line(err, name, "dataset", "voc21")


@pytest.mark.parametrize("name", sorted(HYDRA_APPS))
@pytest.mark.parametrize("setting", ["cache_dir", "hydra.run.dir", "text_cache", "run_dir"])
def test_unusable_folder_is_one_line(name, setting, monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = compose_config(CONFIG_NAMES[name], _dataset_args(name))
    code, err = _in_process(monkeypatch, capsys, HYDRA_APPS[name], *_dataset_args(name), "experiment=tiny",
                            f"{setting}={blocker}/sub")
    assert code == 2
    if setting.startswith("hydra.") or setting in cfg:
        _assert_one_line(err, name, f"{setting}={blocker}/sub", f"{blocker} is a file")
    else:  # the command has no such setting
        _assert_one_line(err, name, setting, "no such key")


def test_multirun_sweep_values_are_each_checked(monkeypatch, capsys):
    code, err = _in_process(monkeypatch, capsys, HYDRA_APPS["proxyclip-segment"], "-m", "experiment=tiny",
                            "method.beta=1.0,abc")
    assert code == 2
    _assert_one_line(err, "proxyclip-segment", "method.beta=abc", "number")


def test_segment_image_without_classes_asks_for_them(monkeypatch, capsys, tmp_path):
    import logging

    Image.new("RGB", (8, 8)).save(tmp_path / "my.png")
    levels = {name: logging.getLogger(name).level for name in ("", "proxyclip")}
    try:  # Hydra runs in this process: leave the logging configuration alone (none), restore the levels
        code, err = _in_process(monkeypatch, capsys, HYDRA_APPS["proxyclip-segment"], "experiment=tiny",
                                f"image={tmp_path / 'my.png'}", f"hydra.run.dir={tmp_path / 'run'}",
                                "hydra/job_logging=none", "hydra/hydra_logging=none")
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    assert code == 2
    _assert_one_line(err, "proxyclip-segment", "classes=", "my.png")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HYDRA_APPS))
def test_mistake_in_a_real_process(name, tmp_path):
    """The wiring as users meet it: a subprocess per entry point, each with another mistake."""
    override, key, expected = MISTAKES[sorted(HYDRA_APPS).index(name) % len(MISTAKES)]
    module = HYDRA_APPS[name].split(":")[0]
    r = subprocess.run([PYTHON, "-m", module, *_dataset_args(name), "experiment=tiny", override], cwd=tmp_path,
                       env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 2
    _assert_one_line(r.stderr, name, key, expected)


@pytest.mark.slow
def test_multirun_with_a_failing_job_exits_2_naming_it(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "good.png")
    missing = tmp_path / "missing.png"
    r = subprocess.run([PYTHON, "-m", "proxyclip.cli.segment", "-m", "experiment=tiny", "classes=[a,b]",
                        f"image={missing},{tmp_path / 'good.png'}", f"hydra.sweep.dir={tmp_path / 'mr'}"],
                       cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("proxyclip-segment: error: 1 of 2 jobs failed: #0") and str(missing) in last
    assert "image file not found" in (tmp_path / "mr" / "0" / "error.txt").read_text()
    shares = json.loads((tmp_path / "mr" / "1" / "shares.json").read_text())  # the other job still ran
    assert shares["image"] == str(tmp_path / "good.png")


def _presets_with_sweeps():
    import yaml

    from proxyclip.config import CONF_DIR

    out = []
    for p in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        params = ((yaml.safe_load(p.read_text()) or {}).get("hydra") or {}).get("sweeper", {}).get("params")
        if params:
            out.append((p.stem, params))
    return out


@pytest.mark.parametrize("preset,params", _presets_with_sweeps())
def test_a_presets_sweep_supplies_the_dataset(preset, params):
    from proxyclip.cli.hydra_app import validate

    assert "dataset" in params  # the presets sweep the datasets: none is given on the command line
    assert validate("eval", [f"experiment={preset}", "weights=random"], True) is None
    bad = validate("eval", [f"experiment={preset}", "method.gama=1"], True)  # and each job is still checked
    assert bad.startswith("method.gama: no such key in method"), bad
