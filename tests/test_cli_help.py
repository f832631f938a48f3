"""Every entry point's --help works without a dataset; its choices are the conf folders' presets
(no schema entries, no fragments); --cfg job prints the composed config."""

import importlib
import subprocess
import tomllib

import pytest
import yaml
from fixtures_eval import PYTHON, REPO, subprocess_env
from omegaconf import OmegaConf

from proxyclip.config import CONF_DIR, compose_config

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _call(target: str, *args: str) -> subprocess.CompletedProcess:
    module, func = target.split(":")
    code = f"import sys; from {module} import {func} as f; sys.argv[1:] = {list(args)!r}; sys.exit(f())"
    return subprocess.run([PYTHON, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=240)


def _conf_choices(group: str) -> list:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_exits_0_and_lists_the_presets(name, tmp_path):
    r = _call(SCRIPTS[name], "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    if "Config groups" not in r.stdout:  # an argparse tool
        assert r.stdout.startswith(f"usage: {name}")
        return
    lines = dict(ln.strip().split(": ", 1) for ln in r.stdout.splitlines() if ln.startswith("  ") and ": " in ln
                 and not ln.startswith("   "))
    groups = {k.split(" ")[0]: v.split(", ") for k, v in lines.items() if (CONF_DIR / k.split(" ")[0]).is_dir()}
    assert groups, r.stdout
    for group, shown in groups.items():
        assert shown == _conf_choices(group), group  # exactly the YAML presets: no *_schema, no _fragments
    assert "_schema" not in r.stdout.split("Config:")[0]


@pytest.mark.slow
def test_cfg_job_prints_the_composed_config(tmp_path):
    args = ["dataset=voc20", "experiment=tiny", "method.gamma=2.5"]
    r = _call(SCRIPTS["proxyclip-eval"], "--cfg", "job", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    printed = yaml.safe_load(r.stdout)
    expected = OmegaConf.to_container(compose_config("eval", args), resolve=False)
    assert printed == expected and printed["method"]["gamma"] == 2.5
    # without a dataset: the same config, the dataset marked as not chosen
    r = _call(SCRIPTS["proxyclip-eval"], "--cfg", "job", "experiment=tiny")
    assert r.returncode == 0, r.stderr[-2000:]
    printed = yaml.safe_load(r.stdout)
    assert printed["dataset"] == "???" and printed["clip"] == expected["clip"]
    assert "# dataset: not chosen" in r.stdout and "voc21" in r.stdout.splitlines()[0]


def test_hydra_entry_points_hide_schema_choices_in_process(capsys, monkeypatch):
    """Fast in-process check of every Hydra entry point's help (the subprocess test above is slow)."""
    import sys

    hydra_apps = [t for t in SCRIPTS.values() if "run_app(" in importlib.util.find_spec(t.split(":")[0]).loader
                  .get_source(t.split(":")[0])]
    assert hydra_apps
    for target in hydra_apps:
        module, func = target.split(":")
        monkeypatch.setattr(sys, "argv", ["prog", "--help"])
        with pytest.raises(SystemExit) as e:
            getattr(importlib.import_module(module), func)()
        assert e.value.code == 0
        out = capsys.readouterr().out
        for group in ("method", "postprocess", "vfm"):
            line = next(ln for ln in out.splitlines() if ln.startswith(f"  {group}"))
            assert line.split(": ", 1)[1].split(", ") == _conf_choices(group)


@pytest.mark.slow
def test_cfg_job_resolve_prints_the_protocols_per_dataset_values(tmp_path):
    """--resolve shows the protocol preset's values for the dataset; without a dataset, its base."""
    r = _call(SCRIPTS["proxyclip-eval"], "--cfg", "job", "--resolve", "dataset=voc21", "protocol=sclip")
    assert r.returncode == 0, r.stderr[-2000:]
    p = yaml.safe_load(r.stdout)["protocol"]
    assert (p["crop"], p["logit_scale"], p["area_thd"], p["classnames"]) == (224, 65.0, 0.1, "sclip/voc21")
    r = _call(SCRIPTS["proxyclip-eval"], "--cfg", "job", "--resolve", "protocol=naclip")
    assert r.returncode == 0, r.stderr[-2000:]
    printed = yaml.safe_load(r.stdout.split("\n", 1)[1])  # after the "# dataset: not chosen" line
    assert printed["protocol"]["crop"] == 224 and printed["postprocess"]["name"] == "pamr"
