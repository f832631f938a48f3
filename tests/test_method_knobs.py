"""A protocol preset's per-dataset method knobs (``method_knobs`` in conf/protocol/<preset>.yaml,
docs/protocol.md "Method knobs"): applied to cfg.method when the composed method is one the
preset's table is for, never to another method; a command-line ``method.<knob>=`` (and a
multirun's swept value) wins over the preset; a bad table is one error naming the file and the
knob; the applied values are part of the run identity (DecodeSpec record, key, flat fields, W&B
config), so two datasets with different knob values give different runs."""

from __future__ import annotations

import functools
import json
import subprocess

import pytest
import yaml
from fixtures_eval import PYTHON, REPO, subprocess_env
from omegaconf import OmegaConf

from proxyclip import compose_config
from proxyclip.evaluation.outputs import wandb_config
from proxyclip.methods import METHODS
from proxyclip.protocol_resolvers import apply_method_knobs, check_method_knobs
from proxyclip.resolve import decode_spec

PROTOCOLS = REPO / "conf" / "protocol"

# ResCLIP's per-dataset knobs as its configs set them (temp_thd, rcs_temp, rcs_weight, sfr_temp,
# sfr_weight; delete_same_entity true everywhere), written here from the method's own tables
RESCLIP = {"voc21": (0.50, 2.0, 0.3, 2.2, 0.7), "context60": (0.30, 2.0, 0.3, 1.8, 0.7),
           "coco_object": (0.11, 2.0, 0.4, 1.8, 0.7), "voc20": (0.10, 2.0, 0.6, 2.1, 0.6),
           "context59": (0.25, 2.0, 0.4, 1.8, 0.7), "coco_stuff": (0.11, 2.0, 0.4, 1.8, 0.7),
           "cityscapes": (0.10, 2.0, 0.2, 2.1, 0.6), "ade20k": (0.25, 2.0, 0.3, 2.1, 0.7)}
# CASS's (global_weight, mean_vector_weight, h_threshold, eigenscaling)
CASS = {"voc21": (0.10, 0.03, 0.10, True), "context60": (0.25, 0.04, 0.09, True),
        "coco_object": (0.25, 0.01, 0.10, True), "voc20": (0.40, 0.02, 0.10, False),
        "context59": (0.25, 0.04, 0.09, True), "coco_stuff": (0.20, 0.02, 0.02, True),
        "cityscapes": (0.10, 0.03, 0.14, False), "ade20k": (0.30, 0.05, 0.06, True)}


def composed(*overrides):
    return compose_config("eval", ["data_root=/nonexistent", *overrides])


@functools.lru_cache(maxsize=None)
def resolved(*overrides):
    """(cfg.method as a dict, the decode's knob values) of ``eval`` with ``overrides`` (cached)."""
    cfg = composed(*overrides)
    return OmegaConf.to_container(cfg.method), dict(decode_spec(cfg).knob_values)


@functools.lru_cache(maxsize=None)
def spec_of(*overrides):
    return decode_spec(composed(*overrides))


def preset_tables():
    """{preset: (methods, {dataset: {knob: value}})} of every shipped preset with a non-empty
    table, read from the YAML files themselves."""
    out = {}
    for f in sorted(PROTOCOLS.glob("*.yaml")):
        raw = yaml.safe_load(f.read_text()) or {}
        if raw.get("method_knobs"):
            out[f.stem] = (raw.get("method_knobs_for") or [raw.get("name", f.stem)], raw["method_knobs"])
    return out


TABLES = preset_tables()
CASES = [(p, m, d, k) for p, (methods, table) in TABLES.items() for m in methods for d, row in table.items()
         for k in row if k in {x.name for x in METHODS[m].all_knobs}]
KNOBS = sorted({(p, m, k) for p, m, _, k in CASES})


def test_the_shipped_tables_include_resclips_and_cass():
    assert {"resclip", "cass"} <= set(TABLES)


@pytest.mark.parametrize("dataset", sorted(RESCLIP))
def test_resclip_preset_sets_its_configs_knobs(dataset):
    m = resolved("protocol=resclip", "method=resclip", f"dataset={dataset}")[0]
    assert tuple(m[k] for k in ("temp_thd", "rcs_temp", "rcs_weight", "sfr_temp", "sfr_weight")) == RESCLIP[dataset]
    assert m["delete_same_entity"] is True and m["base"] == "naclip"  # the rest: the method's YAML


@pytest.mark.parametrize("dataset", sorted(CASS))
def test_cass_preset_sets_its_configs_knobs(dataset):
    m = resolved("protocol=cass", "method=cass", f"dataset={dataset}")[0]
    assert tuple(m[k] for k in ("global_weight", "mean_vector_weight", "h_threshold", "eigenscaling")) == CASS[dataset]
    assert m["k_eigen"] == 20 and m["svd"] == "randomized"


ROWS = sorted({(p, m, d) for p, m, d, _ in CASES})


@pytest.mark.parametrize("preset,method,dataset", ROWS, ids=[f"{p}-{m}-{d}" for p, m, d in ROWS])
def test_every_table_entry_reaches_cfg_method_and_the_decode(preset, method, dataset):
    own = {k.name for k in METHODS[method].all_knobs}
    want = {k: v for k, v in TABLES[preset][1][dataset].items() if k in own}
    node, knobs = resolved(f"protocol={preset}", f"method={method}", f"dataset={dataset}")
    assert want and {k: node[k] for k in want} == want and {k: knobs[k] for k in want} == want


@pytest.mark.parametrize("preset", sorted(TABLES))
def test_another_method_under_the_preset_gets_nothing(preset):
    """protocol=resclip method=proxyclip: the preset's protocol fields, the method's own YAML."""
    methods, table = TABLES[preset]
    other = next(m for m in ("proxyclip", "naclip", "clip") if m not in methods)
    for dataset in list(table)[:2]:
        assert resolved(f"protocol={preset}", f"method={other}", f"dataset={dataset}")[0] == \
            resolved("protocol=proxyclip", f"method={other}", f"dataset={dataset}")[0]


def test_a_dataset_the_table_does_not_list_and_no_dataset_keep_the_methods_yaml():
    yaml_node = OmegaConf.to_container(composed("method=resclip", "dataset=voc21").method)
    cfg = composed("protocol=resclip", "method=resclip", "dataset=custom", "dataset.root=/x")
    assert OmegaConf.to_container(cfg.method) == yaml_node
    cfg = compose_config("segment", ["protocol=resclip", "method=resclip"])
    assert OmegaConf.to_container(cfg.method) == yaml_node


def test_the_command_line_wins_over_the_preset_knob_by_knob():
    cfg = composed("protocol=resclip", "method=resclip", "dataset=voc21", "method.temp_thd=0.2")
    assert cfg.method.temp_thd == 0.2 and cfg.method.sfr_temp == 2.2  # the others: still the preset's
    # a value equal to the YAML's default is still the user's choice
    cfg = composed("protocol=resclip", "method=resclip", "dataset=voc21", "method.temp_thd=0.11")
    assert cfg.method.temp_thd == 0.11
    # the table itself is a protocol field like any other
    cfg = composed("protocol=resclip", "method=resclip", "dataset=voc21", "protocol.method_knobs.voc21.temp_thd=0.4")
    assert cfg.method.temp_thd == 0.4
    assert composed("protocol=resclip", "method=resclip", "dataset=voc20",
                    "protocol.method_knobs.voc21.temp_thd=0.4").method.temp_thd == 0.1  # that dataset only
    # a later change in Python wins too (the knobs are applied once, at composition)
    cfg.method.temp_thd = 0.33
    assert decode_spec(cfg).knob_values["temp_thd"] == 0.33


def test_method_knobs_for_names_the_methods_and_defaults_to_the_presets_name():
    table = ("protocol=lposs", "dataset=voc20", "protocol.method_knobs_for=[naclip]",
             "+protocol.method_knobs.voc20.gaussian_std=3.0")
    assert composed(*table, "method=naclip").method.gaussian_std == 3.0
    plain = OmegaConf.to_container(composed("protocol=lposs", "dataset=voc20", "method=lposs").method)
    assert OmegaConf.to_container(composed(*table, "method=lposs").method) == plain  # lposs: not in the list
    both = ("protocol=lposs", "dataset=voc20", "+protocol.method_knobs.voc20={r: 7, alpha: 0.5}")
    cfg = composed(*both, "method=lposs_plus")
    assert (cfg.method.r, cfg.method.alpha) == (7, 0.5)  # lposs' preset is for both of its methods
    cfg = composed(*both, "method=lposs")
    assert cfg.method.alpha == 0.5 and "r" not in cfg.method  # a knob of LPOSS+ only: not applied to LPOSS
    cfg = composed("protocol=cass", "method=naclip", "dataset=voc20", "+protocol.method_knobs.voc20.gaussian_std=3.0")
    assert cfg.method.gaussian_std == 5.0  # the default list: [cass], the preset's name


def test_decoding_another_method_takes_the_presets_knobs_for_it():
    """A Segmenter configured with method=proxyclip under protocol=resclip decoding method resclip:
    that method's YAML, with the preset's knobs for the dataset (they are the dataset's protocol)."""
    from proxyclip.resolve import method_knobs

    cfg = composed("protocol=resclip", "method=proxyclip", "dataset=voc20")
    _, values = method_knobs(cfg, "resclip", {})
    assert (values["temp_thd"], values["rcs_weight"], values["sfr_temp"]) == (0.10, 0.6, 2.1)
    assert method_knobs(cfg, "resclip", {"temp_thd": 0.7})[1]["temp_thd"] == 0.7  # a decode's own value wins
    cfg = composed("protocol=proxyclip", "method=proxyclip", "dataset=voc20")
    assert method_knobs(cfg, "resclip", {})[1]["temp_thd"] == 0.11  # no preset: the YAML's


@pytest.mark.parametrize("override,match", [
    ("+protocol.method_knobs.voc21.temp_th=0.1",
     r"conf/protocol/resclip.yaml: method_knobs.voc21.temp_th is not a knob of method resclip; its knobs: .*temp_thd"),
    ("protocol.method_knobs.voc21.temp_thd=abc",
     r"conf/protocol/resclip.yaml: method_knobs.voc21.temp_thd must be a number"),
    ("+protocol.method_knobs.voc21.base=nacl", r"conf/protocol/resclip.yaml: method_knobs.voc21.base must be one of"),
    ("+protocol.method_knobs.voc21.logit_scale=50",
     r"method_knobs.voc21.logit_scale is not a knob of method resclip \(a protocol field"),
    ("protocol.method_knobs_for=[resclipp]", r"conf/protocol/resclip.yaml: method_knobs apply to method 'resclipp'"),
    ("protocol.method_knobs.voc21=3", r"conf/protocol/resclip.yaml: method_knobs.voc21 must be a mapping"),
])
def test_a_bad_table_is_one_error_naming_the_file_and_the_knob(override, match):
    # checked whichever method is composed (a typo in a preset shows at once)
    for method in ("resclip", "proxyclip"):
        with pytest.raises(ValueError, match=match):
            composed("protocol=resclip", f"method={method}", "dataset=voc20", override)


def _other_value(meth_name: str, knob: str, value):
    """A valid value of ``knob`` other than ``value`` (by its declaration)."""
    decl = next(k for k in METHODS[meth_name].all_knobs if k.name == knob)
    if decl.kind == "bool":
        return not value
    if decl.kind == "choice":
        return next(c for c in decl.choices if c != value)
    if decl.kind == "ints":
        return [v + 1 for v in value] if decl.high is None else [v - 1 for v in value]
    for cand in (value * 0.5, value * 0.5 + 0.01, value + 1, value * 2):
        cand = int(cand) if decl.kind == "int" else cand
        try:
            if decl.check(cand) != value:
                return cand
        except ValueError:
            pass
    raise AssertionError(f"no other valid value of {knob}")


@pytest.mark.parametrize("preset,method,knob", KNOBS, ids=[f"{p}-{m}-{k}" for p, m, k in KNOBS])
def test_applied_knobs_are_the_run_identity(preset, method, knob):
    """For each knob a preset sets: the datasets' values are in their decode specs (record, flat
    fields, W&B config); two runs whose only difference is that knob's value (one dataset's
    value on the other dataset) have different keys and records."""
    table = TABLES[preset][1]
    datasets = [d for d in table if knob in table[d]]
    a = datasets[0]
    va = table[a][knob]
    b = next((d for d in datasets if table[d][knob] != va), None)
    other = table[b][knob] if b is not None else _other_value(method, knob, va)
    base = (f"protocol={preset}", f"method={method}", f"dataset={a}")
    spec = spec_of(*base)
    flip = spec_of(*base, f"method.{knob}={json.dumps(other)}")
    assert spec.record()["knobs"][knob] == va and flip.record()["knobs"][knob] == other
    assert spec.flat()[knob] == va and flip.flat()[knob] == other
    assert spec.key() != flip.key() and spec.record() != flip.record()
    assert wandb_config({"dataset": a, "encode": {}, "selection": {}}, "eval", spec.record())["decode"]["knobs"][knob] == va
    if b is not None:  # the other dataset's own run has its own value
        assert spec_of(f"protocol={preset}", f"method={method}", f"dataset={b}").flat()[knob] == other


def test_check_method_knobs_types_the_values():
    p = composed("protocol=cass", "method=cass", "dataset=voc21").protocol
    table = check_method_knobs(p)
    assert table["voc20"] == {"global_weight": 0.4, "mean_vector_weight": 0.02, "h_threshold": 0.1,
                              "eigenscaling": False}
    assert all(isinstance(v, float) for v in table["voc21"].values() if not isinstance(v, bool))


def test_apply_returns_what_it_wrote_and_respects_chosen_keys():
    from hydra import compose, initialize_config_dir

    from proxyclip.config import CONF_DIR

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):  # Hydra's own compose: nothing applied
        cfg = compose("eval", ["data_root=/x", "protocol=resclip", "method=resclip", "dataset=voc21",
                               "method.sfr_temp=1.5"])
    assert cfg.method.temp_thd == 0.11
    written = apply_method_knobs(cfg, ["method.sfr_temp"])
    assert written == {"temp_thd": 0.5, "rcs_temp": 2.0, "rcs_weight": 0.3, "sfr_weight": 0.7,
                       "delete_same_entity": True}
    assert cfg.method.sfr_temp == 1.5 and cfg.method.temp_thd == 0.5


# ---------------------------------------------------------------------------------------------- the apps
TINY = ["clip=test_tiny", "weights=random", "protocol.short_side=64", "batch_size=2", "progress=false",
        "checkpoint_seconds=0", "method.rcs_layers=[0]"]


@pytest.mark.slow
def test_proxyclip_eval_applies_the_preset_and_a_swept_value_wins(tmp_path):
    """The Hydra app: in a multirun under protocol=resclip on VOC21 the swept method.temp_thd of
    each job wins over the preset; the other knobs are the preset's (sfr_temp 2.2, the YAML's 1.8)."""
    from fixtures_datasets import make_voc

    make_voc(tmp_path, n=1)
    r = subprocess.run([PYTHON, "-m", "proxyclip.cli.evaluate", "-m", "protocol=resclip", "method=resclip",
                        "dataset=voc21", f"data_root={tmp_path}", *TINY, "method.temp_thd=0.2,0.3",
                        f"hydra.sweep.dir={tmp_path / 'mr'}"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = sorted((k["temp_thd"], k["sfr_temp"], k["rcs_weight"]) for k in
                 (json.loads(p.read_text())["decode"]["knobs"] for p in (tmp_path / "mr").rglob("metrics.json")))
    assert got == [(0.2, 2.2, 0.3), (0.3, 2.2, 0.3)]


def test_the_apps_command_line_check_names_a_bad_table_in_one_line():
    """proxyclip-eval / -sweep / -segment compose the command line before running (hydra_app.validate):
    a bad preset table is its one-line error (the app prints it and exits 2)."""
    from proxyclip.cli.hydra_app import validate

    base = ["protocol=resclip", "method=resclip", "dataset=voc21", "data_root=/nonexistent"]
    message = validate("eval", [*base, "+protocol.method_knobs.voc21.temp_th=0.1"], False)
    assert message.startswith("conf/protocol/resclip.yaml: method_knobs.voc21.temp_th is not a knob of method resclip")
    assert "\n" not in message
    assert validate("eval", [*base, "method.temp_thd=0.2,0.3"], True) is None
