"""proxyclip-summary on metrics.json records made from real specs (as proxyclip-eval writes them):
rows told apart by every field of the run identity, published numbers matched on every field,
pivots on any two fields; the paper presets in conf/experiment/ (composition and grid sizes), and
one preset run end to end on fixture data."""

from __future__ import annotations

import copy
import csv
import functools
import io
import json
import math
import subprocess

import pytest
import yaml
from fixtures_eval import PYTHON, REPO, subprocess_env
from omegaconf import OmegaConf

from proxyclip.config import compose_config
from proxyclip.data import read_class_lines
from proxyclip.evaluation.published import METHODS_B16, OWN_PROTOCOL_B16, PAPER_DATASETS, PAPER_MAIN, find_published
from proxyclip.evaluation.records import collect, fields_of
from proxyclip.evaluation.report import Cell, cell_text, to_csv, to_markdown
from proxyclip.evaluation.summary import PIVOTS, build_tables, default_kind, summarize
from proxyclip.methods import METHODS, get_method
from proxyclip.resolve import decode_spec
from proxyclip.specs import EncodeSpec, differing, digest, flatten

B16, L14 = "ViT-B-16/openai", "ViT-L-14/openai"
HEADER_MAIN = ["method", "CLIP", "VFM", "setting"]
PAPER = ("method=proxyclip", "clip=vit_b16", "vfm=dino_vitb8")  # the published ProxyCLIP B/16 + DINO B/8


@functools.lru_cache(maxsize=None)
def _identity(dataset: str, overrides: tuple, random_weights: bool) -> str:
    """encode / decode / selection of a run of ``eval`` with these overrides, as the runner records them."""
    cfg = compose_config("eval", [f"dataset={dataset}", *overrides])
    enc = EncodeSpec.from_config(cfg, random_weights=random_weights,
                                 uses_vfm=get_method(str(cfg.method.name)).needs_vfm).record()
    enc["precision"] = "fp32"  # what precision=auto resolves to on a CPU
    d = cfg.dataset
    background = OmegaConf.to_container(d.background) if d.background is not None else None
    dec = decode_spec(cfg, classes=read_class_lines(str(d.classnames), background)).record()
    sel = {"dataset": dataset, "num_samples": 100 if cfg.limit is None else cfg.limit,
           "samples": digest([dataset, cfg.limit, cfg.limit_seed]), "limit": cfg.limit, "limit_seed": cfg.limit_seed,
           "reduce_zero_label": bool(d.reduce_zero_label), "ignore_index": int(d.ignore_index),
           "classnames": str(d.classnames), "background": background}
    return json.dumps({"encode": enc, "decode": dec, "selection": sel})


def rec(dataset, miou, *overrides, experiment=None, random_weights=False, **edits):
    """A metrics.json record of ``eval`` with ``overrides`` (default: the published ProxyCLIP B/16 +
    DINO B/8 configuration); ``edits``: record paths with ``__`` for dots, e.g. ``decode__method="x"``."""
    r = json.loads(_identity(dataset, tuple(overrides or PAPER), random_weights))
    r.update(dataset=dataset, mIoU=miou, experiment=experiment, random_weights=random_weights, device="cpu",
             model_key="k", aAcc=90.0, mAcc=miou, num_images=100, per_class=[])
    for path, value in edits.items():
        put(r, path.split("__"), value)
    return r


def put(r: dict, path, value) -> None:
    for k in path[:-1]:
        r = r[k]
    r[path[-1]] = value


def write(tmp_path, records, name="runs"):
    """Each record as ``<name>/<i>/metrics.json``; returns the folder."""
    root = tmp_path / name
    for i, r in enumerate(records):
        (root / f"{i:03d}").mkdir(parents=True)
        (root / f"{i:03d}" / "metrics.json").write_text(json.dumps(r))
    return root


def tables(tmp_path, records, *args, **kwargs):
    return build_tables(collect([write(tmp_path, records)]), *args, **kwargs)


def md_rows(md: str) -> list:
    """The cells of every table row of a markdown table (header and rule lines left out)."""
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def body(tmp_path, records, *args, **kwargs) -> list:
    return md_rows(to_markdown(tables(tmp_path, records, *args, **kwargs)))[1:]


# ----------------------------------------------------------------------------------------------
# records


def test_a_record_without_a_run_identity_is_refused_naming_the_file(tmp_path):
    old = {"dataset": "voc21", "mIoU": 50.0, "method": "proxyclip", "clip": B16, "vfm": "dino_vitb8",
           "params": {"beta": 1.2}}
    root = write(tmp_path, [rec("voc21", 1.0), old])
    with pytest.raises(ValueError, match=r"001/metrics.json: no 'encode', 'decode', 'selection' run identity.*older"):
        collect([root])
    broken = rec("voc21", 1.0, decode__knobs__beta=1.0)
    broken["encode"]["clip"]["extra"] = 1
    with pytest.raises(ValueError, match=r"000/metrics.json: .*does not fit this version's specs"):
        collect([write(tmp_path, [broken], "b")])


# ----------------------------------------------------------------------------------------------
# rows: every field of the run identity


def _leaves():
    """Every leaf of a record's encode, decode and selection (ProxyCLIP with a VFM and PAMR, so
    that every kind of field is present), derived from the specs themselves."""
    r = rec("voc21", 1.0, *PAPER, "postprocess=pamr")
    return [p for part in ("encode", "decode", "selection") for p in (f"{part}.{k}" for k in flatten(r[part]))
            if p != "selection.dataset"]  # the dataset is a column: test_rows_split_...


def _perturb(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v + 1
    if isinstance(v, str):
        return v + "x"
    if isinstance(v, list):
        return v + [3]
    return 7  # None


@pytest.mark.parametrize("path", _leaves())
def test_changing_any_one_field_of_the_run_identity_gives_a_distinct_labelled_row(tmp_path, path):
    base = rec("voc21", 10.0, *PAPER, "postprocess=pamr")
    other = copy.deepcopy(base)
    keys = path.split(".")
    node = other
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = _perturb(node[keys[-1]])
    other["mIoU"] = 20.0
    root = write(tmp_path, [base, other])
    a, b = collect([root])
    (changed,) = differing(fields_of(a), fields_of(b))  # exactly one flat field
    rows = md_rows(to_markdown(build_tables([a, b], "main")))[1:]
    assert sorted(r[4] for r in rows) == ["10.0", "20.0"]  # two rows, one result each
    labels = {r[4]: r[:4] for r in rows}
    assert labels["10.0"] != labels["20.0"]
    in_column = {"method": 0, "clip.name": 1, "clip.pretrained": 1, "vfm.name": 2}
    if changed in in_column:
        assert labels["10.0"][in_column[changed]] != labels["20.0"][in_column[changed]]
    else:  # the setting column names the field
        assert f"{changed}=" in labels["20.0"][3]


@pytest.mark.parametrize("method, knob", [(m.name, k.name) for m in METHODS.values() for k in m.knobs])
def test_every_knob_of_every_registered_method_tells_rows_apart(tmp_path, method, knob):
    base = rec("voc21", 10.0, f"method={method}")
    other = copy.deepcopy(base)
    other["decode"]["knobs"][knob] = _perturb(other["decode"]["knobs"][knob])
    other["mIoU"] = 20.0
    rows = body(tmp_path, [base, other], "main")
    assert len(rows) == 2 and f"{knob}=" in {r[4].split(" ")[0]: r[3] for r in rows}["20.0"]


def test_rows_split_by_settings_not_by_each_datasets_protocol(tmp_path):
    assert compose_config("eval", ["dataset=voc21"]).protocol.prob_thd != \
        compose_config("eval", ["dataset=context60"]).protocol.prob_thd  # the per-dataset fields differ ...
    records = [rec("voc21", 60.0), rec("context60", 30.0), rec("voc21", 55.0, *PAPER, "method.beta=1.0"),
               rec("context60", 25.0, *PAPER, "method.beta=1.0"), rec("voc21", 40.0, "method=sclip"),
               rec("context60", 20.0, "method=sclip"), rec("voc21", 10.0, "weights=random", "postprocess=pamr")]
    rows = body(tmp_path, records, "main")
    # ... yet a method's runs on both datasets share one row
    assert [(r[0], r[3]) for r in rows] == [("sclip", ""), ("proxyclip", ""), ("proxyclip", "beta=1.0"),
                                            ("proxyclip", "weights.source=random postprocess=pamr")]
    assert rows[0][4:] == ["40.0 (59.1, -19.1)", "20.0 (30.4, -10.4)", "30.0 (44.8, -14.8)"]
    assert rows[1][4:] == ["60.0 (61.3, -1.3)", "30.0 (35.3, -5.3)", "45.0 (48.3, -3.3)"]
    assert rows[2][4:] == ["55.0", "25.0", "40.0"]  # beta=1.0 is not the published configuration
    assert rows[3][4:] == ["10.0", "-", "10.0*"]


@pytest.mark.parametrize("a, b, shown", [
    (("vfm.norm=true",), ("vfm.norm=false",), "vfm.norm=off"),
    (("postprocess=pamr_naclip",), ("postprocess=pamr_talk2dino",),
     "postprocess=pamr postprocess.dilations=[1,2,4,8,12,24]"),
    ((), ("protocol.crop=224",), "protocol.crop=224"),
    ((), ("protocol.stride=56",), "protocol.stride=56"),
    ((), ("limit=50",), "limit=50"),
], ids=["vfm.norm", "pamr presets", "crop", "stride", "limit"])
def test_the_issues_examples_are_distinct_rows_named_by_their_difference(tmp_path, a, b, shown):
    rows = body(tmp_path, [rec("voc21", 1.0, *PAPER, *a), rec("voc21", 2.0, *PAPER, *b),
                           rec("ade20k", 3.0, *PAPER, *b)], "main")
    assert len(rows) == 2
    by_value = {r[4].split(" ")[0]: r for r in rows}
    assert by_value["2.0"][3] == shown and by_value["2.0"][5] == "3.0"  # both datasets in one row
    assert by_value["2.0"][3] != by_value["1.0"][3]


def test_the_per_dataset_reference_is_the_dataset_with_the_records_preset(tmp_path):
    """experiment=tiny sets the window: a tiny run recorded with its preset is at its default
    protocol; the same specs recorded without it differ from voc21's shipped 336-px window."""
    tiny = rec("voc21", 1.0, "experiment=tiny", experiment="tiny")
    bare = rec("voc21", 2.0, "experiment=tiny", experiment=None)
    assert tiny["encode"]["protocol"]["crop"] == 64 != compose_config("eval", ["dataset=voc21"]).protocol.crop
    rows = body(tmp_path, [tiny, bare], "main")
    assert {r[4]: r[3] for r in rows} == {"1.0": "", "2.0": "protocol.short_side=64 protocol.crop=64 protocol.stride=32"}
    # one row: what it shares with no other row, but differs from the shipped config, is said under the table
    md = to_markdown(tables(tmp_path / "one", [bare]))
    assert md_rows(md)[1][3] == "" and "- All runs: weights.source=random protocol.short_side=64 protocol.crop=64 " \
        "protocol.stride=32." in md


def test_a_dataset_without_a_yaml_is_compared_by_its_raw_values(tmp_path):
    def mine(miou, *overrides):
        r = rec("voc21", miou, *PAPER, *overrides)
        r["dataset"] = r["selection"]["dataset"] = "mydata"
        return r

    rows = body(tmp_path, [mine(1.0), mine(2.0, "protocol.crop=224"), mine(3.0, "protocol.crop=224")], "main")
    assert [(r[3], r[4]) for r in rows] == [("protocol.crop=224", "3.0"), ("protocol.crop=336", "1.0")]


def test_a_rerun_replaces_the_older_result(tmp_path):
    rows = body(tmp_path, [rec("voc21", 1.0, "method=sclip"), rec("voc21", 2.0, "method=sclip")], "main")
    assert len(rows) == 1 and rows[0][4].startswith("2.0")


# ----------------------------------------------------------------------------------------------
# published numbers


@pytest.mark.parametrize("row", PAPER_MAIN + METHODS_B16 + OWN_PROTOCOL_B16,
                         ids=lambda r: f"{r.label} [{r.source[:6]}]")
def test_published_values_agree_with_the_papers_own_average(row):
    assert len(row.miou) == len(PAPER_DATASETS) == 8
    # the paper averages unrounded values: each value and the average are off by up to 0.05
    assert abs(sum(row.miou) / 8 - row.avg) <= 0.1 + 1e-9
    assert row.source


@pytest.mark.parametrize("row", PAPER_MAIN + METHODS_B16 + OWN_PROTOCOL_B16,
                         ids=lambda r: f"{r.label} [{r.source[:6]}]")
def test_a_run_of_a_published_rows_overrides_gets_its_numbers_in_fp16_too(tmp_path, row):
    records = collect([write(tmp_path, [rec("voc21", 1.0, *row.overrides),
                                        rec("voc21", 1.0, *row.overrides, encode__precision="fp16")])])
    assert find_published(records, (row,)) is row and fields_of(records[0])["method"] == row.method


MISMATCHES = {  # what makes a run not the published configuration
    "vfm.norm=false": dict(overrides=("vfm.norm=false",)),
    "random weights": dict(random_weights=True),
    "weights=random": dict(overrides=("weights=random",)),
    "pamr": dict(overrides=("postprocess=pamr",)),
    "crop=224": dict(overrides=("protocol.crop=224",)),
    "limit=50": dict(overrides=("limit=50",)),
    "background words": dict(overrides=("dataset.background=[sky,wall]",)),
    "other VFM": dict(overrides=("vfm=dinov2_vitb14_reg",)),
    "other CLIP tag": dict(overrides=("clip.pretrained=laion2b_s34b_b88k",)),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_no_published_number_beside_a_run_that_differs_from_the_published_config(tmp_path, case):
    spec = MISMATCHES[case]
    measured = rec("voc21", 50.0, *PAPER, *spec.get("overrides", ()), random_weights=spec.get("random_weights", False))
    records = collect([write(tmp_path, [rec("voc21", 61.04), measured])])
    assert find_published(records[:1]) is PAPER_MAIN[3] and find_published(records[1:]) is None
    rows = md_rows(to_markdown(build_tables(records, "main")))[1:]
    cells = {r[4].split(" ")[0]: r[4] for r in rows}
    assert cells == {"61.0": "61.0 (61.3, -0.3)", "50.0": "50.0"}


def test_main_table_cells_published_diffs_averages_and_notes(tmp_path):
    records = [rec("voc21", 61.04), rec("ade20k", 20.0), rec("voc21", 60.0, "clip=vit_l14"),
               rec("voc21", 50.0, "method=sclip", decode__method="mymethod")]
    (table,) = tables(tmp_path, records, "main")
    md = to_markdown([table])
    rows = md_rows(md)
    assert rows[0] == HEADER_MAIN + ["VOC21", "ADE", "avg"]  # datasets present, in the paper's order
    assert [r[:4] for r in rows[1:]] == [["proxyclip", B16, "dino_vitb8", ""], ["proxyclip", L14, "dino_vitb8", ""],
                                         ["mymethod", B16, "none", ""]]
    # B/16: published 61.3 and 20.2; avg (61.04 + 20) / 2 = 40.52 vs (61.3 + 20.2) / 2 = 40.75
    assert rows[1][4:] == ["61.0 (61.3, -0.3)", "20.0 (20.2, -0.2)", "40.5 (40.8, -0.3)"]
    # L/14 has no ADE: its average is over VOC21 only, marked, against the published VOC21 alone
    assert rows[2][4:] == ["60.0 (60.6, -0.6)", "-", "60.0* (60.6, -0.6)"]
    assert rows[3][4:] == ["50.0", "-", "50.0*"]  # no published row for this method
    assert ("Published ProxyCLIP B/16 + DINO B/8, ProxyCLIP L/14 + DINO B/8: ProxyCLIP paper (Lan et al., ECCV 2024)"
            in md)
    assert "fp16" in md and "own protocol" not in md

    lines = list(csv.reader(io.StringIO(to_csv([table]))))
    assert lines[0] == ["table"] + HEADER_MAIN + ["VOC21", "VOC21 published", "VOC21 diff", "ADE", "ADE published",
                                                  "ADE diff", "avg", "avg published", "avg diff"]
    b16 = lines[1]
    assert b16[:4] == ["main", "proxyclip", B16, "dino_vitb8"]
    assert [float(x) for x in b16[5:8]] == pytest.approx([61.04, 61.3, 61.04 - 61.3])
    assert [float(x) for x in b16[11:14]] == pytest.approx([40.52, 40.75, 40.52 - 40.75])
    assert lines[3][5:8] == ["50.0000", "", ""] and len(lines) == 4


def test_all_eight_benchmarks_in_the_papers_column_order(tmp_path):
    records = [rec(d, 10.0 + PAPER_DATASETS.index(d)) for d in reversed(PAPER_DATASETS)]
    rows = md_rows(to_markdown(tables(tmp_path, records, "main")))
    assert rows[0][4:] == ["VOC21", "PC60", "Object", "VOC20", "PC59", "Stuff", "City", "ADE", "avg"]
    assert [c.split(" ")[0] for c in rows[1][4:]] == ["10.0", "11.0", "12.0", "13.0", "14.0", "15.0", "16.0", "17.0",
                                                      "13.5"]
    assert rows[1][-1] == "13.5 (42.3, -28.8)"  # against the paper's own average column


def test_paper_flag_all_columns_and_reference_rows_in_paper_order(tmp_path):
    (table,) = tables(tmp_path, [rec("voc21", 62.0)], "main", paper=True)
    rows = md_rows(to_markdown([table]))
    assert rows[0][4:] == ["VOC21", "PC60", "Object", "VOC20", "PC59", "Stuff", "City", "ADE", "avg"]
    assert [r[0] for r in rows[1:]] == ["CLIP ViT-B/16 (vanilla)", "SCLIP B/16", "NACLIP B/16", "proxyclip",
                                        "ProxyCLIP L/14 + DINO B/8", "ProxyCLIP H/14 (LAION) + DINO B/8"]
    assert rows[1][1:3] == [B16, "-"] and rows[6][1:3] == ["ViT-H-14/laion2b_s32b_b79k", "dino_vitb8"]
    assert rows[4][4:6] == ["62.0 (61.3, +0.7)", "-"] and rows[4][-1] == "62.0* (61.3, +0.7)"
    assert rows[6][3] == "published" and rows[6][4] == "(65.0)" and rows[6][-1] == "(44.4)"


def test_methods_table_rows_in_method_order_with_each_papers_numbers(tmp_path):
    methods = ["naclip", "mymethod", "clip", "proxyclip", "maskclip", "sclip", "clearclip"]
    records = [rec("voc21", 10.0 + i, *((f"method={m}",) if m != "mymethod" else ("method=sclip",)),
                   **({"decode__method": m} if m == "mymethod" else {}))
               for i, m in enumerate(methods)]
    (table,) = tables(tmp_path, records, "methods")
    rows = md_rows(to_markdown([table]))[1:]
    assert [r[0] for r in rows] == ["clip", "maskclip", "sclip", "clearclip", "naclip", "proxyclip", "mymethod"]
    assert {r[3] for r in rows} == {""}  # each method's knobs follow from the method
    by = {r[0]: r[4] for r in rows}
    assert by["clip"] == "12.0 (18.8, -6.8)"  # CLIP as the SCLIP paper reports it
    assert by["maskclip"] == "14.0 (43.4, -29.4)" and by["clearclip"] == "16.0 (51.8, -35.8)"
    assert by["naclip"] == "10.0 (58.9, -48.9)" and by["mymethod"] == "11.0"
    own = [n for n in table.notes if "own protocol" in n]
    assert own == ["CLIP ViT-B/16, MaskCLIP ViT-B/16, SCLIP ViT-B/16, ClearCLIP ViT-B/16, NACLIP ViT-B/16: published "
                   "under the paper's own protocol; measured under ProxyCLIP's."]
    main = {r[0]: r[4] for r in body(tmp_path / "m", records, "main")}
    assert main["clip"] == "12.0 (16.4, -4.4)"  # the main table quotes the ProxyCLIP paper's vanilla CLIP


# ----------------------------------------------------------------------------------------------
# pivots


def test_vfm_table_mean_over_datasets_and_one_table_a_dataset(tmp_path):
    vals = {("dino_vitb8", "vit_b16"): (60.0, 20.0), ("dino_vitb8", "vit_l14"): (62.0, 24.0),
            ("sam_vitb", "vit_b16"): (50.0, 10.0), ("sam_vitb", "vit_l14"): (52.0, None)}
    records = [rec(d, v, "method=proxyclip", f"clip={c}", f"vfm={f}") for (f, c), pair in vals.items()
               for d, v in zip(("voc21", "ade20k"), pair) if v is not None]
    records.append(rec("voc21", 1.0, "method=proxyclip", "clip=vit_b16", "vfm=mae_vitb16", "limit=10"))
    ts = tables(tmp_path, records, "vfm")
    assert [t.name for t in ts] == ["average", "voc21", "ade20k"]
    rows = md_rows(to_markdown(ts[:1]))
    assert rows[0] == ["vfm.name", "setting", "clip.name=ViT-B-16", "clip.name=ViT-L-14"]
    assert rows[1] == ["dino_vitb8", "", "40.0", "43.0"]  # (60 + 20) / 2, (62 + 24) / 2
    assert rows[2] == ["sam_vitb", "", "30.0", "52.0*"]  # only VOC21 for L/14
    assert rows[3] == ["mae_vitb16", "limit=10", "1.0*", "-"]
    voc = md_rows(to_markdown(ts[1:2]))
    assert [r[2:] for r in voc[1:]] == [["60.0", "62.0"], ["50.0", "52.0"], ["1.0", "-"]]
    md = to_markdown(ts)
    assert md.count("No published numbers for this table in our docs") == 3 and "(" not in "".join(r[2] for r in rows)
    again = md_rows(to_markdown(tables(tmp_path / "again", records, rows="vfm", cols="clip")))
    assert again == md_rows(md)  # --table vfm is --rows vfm.name --cols clip.name


def test_beta_gamma_grid_per_dataset_and_mean_is_the_pivot_on_beta_and_gamma(tmp_path):
    records = [rec(d, 10 * b + g + k, *PAPER, f"method.beta={b}", f"method.gamma={g}")
               for k, d in enumerate(("voc21", "context59")) for b in (1.6, 1.0, 1.2) for g in (5.0, 2.0)]
    ts = tables(tmp_path, records, "beta_gamma")
    assert [t.name for t in ts] == ["average", "voc21", "context59"]
    rows = md_rows(to_markdown(ts))
    assert rows[0] == ["beta", "gamma=2.0", "gamma=5.0"]
    assert rows[1:4] == [["1.0", "12.5", "15.5"], ["1.2", "14.5", "17.5"], ["1.6", "18.5", "21.5"]]
    assert rows[5:8] == [["1.0", "12.0", "15.0"], ["1.2", "14.0", "17.0"], ["1.6", "18.0", "21.0"]]
    assert rows[9][1:] == ["13.0", "16.0"]
    lines = list(csv.reader(io.StringIO(to_csv(ts))))
    assert lines[0] == ["table", "beta", "gamma=2.0", "gamma=5.0"] and len(lines) == 1 + 9
    assert lines[1] == ["average", "1.0", "12.5000", "15.5000"]
    for rows_, cols_ in (("beta", "gamma"), ("method.beta", "method.gamma")):
        assert md_rows(to_markdown(tables(tmp_path / rows_, records, rows=rows_, cols=cols_))) == rows
    assert PIVOTS["beta_gamma"] == ("beta", "gamma")


def test_norm_mask_two_by_two_and_shared_setting_said_once(tmp_path):
    records = [rec("voc21", 40.0 + 2 * s + m, *PAPER, "weights=random", f"method.shift={bool(s)}",
                   f"method.mask={bool(m)}") for s in (1, 0) for m in (1, 0)]
    (table,) = tables(tmp_path, records, "norm_mask")
    md = to_markdown([table])
    assert md_rows(md) == [["shift", "mask=off", "mask=on"], ["off", "40.0", "41.0"], ["on", "42.0", "43.0"]]
    assert "All runs: weights.source=random." in md


def test_pivot_on_any_two_fields_hand_worked(tmp_path):
    """rows = vfm.layer, columns = protocol.crop, two datasets; one extra run without the VFM's
    norm is a row of its own; a cell is the mean of its two datasets."""
    values = {}
    records = []
    for k, d in enumerate(("voc21", "ade20k")):
        for layer in (-1, -2):
            for crop in (224, 336):
                values[(d, layer, crop)] = 30.0 + k * 10 + layer + crop / 100
                records.append(rec(d, values[(d, layer, crop)], *PAPER, f"vfm.layer={layer}", f"protocol.crop={crop}"))
    records.append(rec("voc21", 5.0, *PAPER, "vfm.norm=false", "protocol.crop=336"))
    ts = tables(tmp_path, records, rows="vfm.layer", cols="protocol.crop")
    assert [t.name for t in ts] == ["average", "voc21", "ade20k"]
    rows = md_rows(to_markdown(ts[:1]))
    assert rows[0] == ["vfm.layer", "setting", "protocol.crop=224", "protocol.crop=336"]
    mean = {(layer, crop): (values[("voc21", layer, crop)] + values[("ade20k", layer, crop)]) / 2
            for layer in (-1, -2) for crop in (224, 336)}
    assert rows[1] == ["-2", "", f"{mean[(-2, 224)]:.1f}", f"{mean[(-2, 336)]:.1f}"]
    assert rows[2] == ["-1", "", f"{mean[(-1, 224)]:.1f}", f"{mean[(-1, 336)]:.1f}"]
    assert rows[3] == ["-1", "vfm.norm=off", "-", "5.0*"]
    ade = md_rows(to_markdown(ts[2:]))
    assert ade[1][2:] == [f"{values[('ade20k', -2, 224)]:.1f}", f"{values[('ade20k', -2, 336)]:.1f}"]


def test_pivot_columns_carry_the_fields_that_follow_them(tmp_path):
    """cols = clip.name: each CLIP's tag and QuickGELU travel with it, not into the setting."""
    records = [rec("voc21", 1.0, "clip=vit_b16"), rec("voc21", 2.0, "clip=vit_h14")]
    assert fields_of(collect([write(tmp_path, records[1:], "h")])[0])["clip.pretrained"] != "openai"
    rows = md_rows(to_markdown(tables(tmp_path, records, rows="vfm.name", cols="clip.name")))
    assert rows == [["vfm.name", "clip.name=ViT-B-16", "clip.name=ViT-H-14"], ["dino_vitb8", "1.0", "2.0"]]
    # a method without a VFM: its row reads vfm none, and what else differs is its setting
    rows = md_rows(to_markdown(tables(tmp_path / "s", records + [rec("voc21", 3.0, "method=sclip")], rows="vfm",
                                      cols="clip")))
    assert rows == [["vfm.name", "setting", "clip.name=ViT-B-16", "clip.name=ViT-H-14"],
                    ["dino_vitb8", "", "1.0", "2.0"], ["none", "method=sclip", "3.0", "-"]]


def test_unknown_pivot_field_is_one_error_listing_the_fields(tmp_path):
    records = collect([write(tmp_path, [rec("voc21", 1.0)])])
    with pytest.raises(ValueError, match=r"unknown field 'gama': the records have .*\bvfm\.layer\b.*\bbeta\b") as e:
        build_tables(records, rows="gama", cols="beta")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="both --rows and --cols"):
        build_tables(records, rows="beta")


def test_cli_pivot_and_its_errors(tmp_path, capsys):
    from proxyclip.cli.summary import main

    root = write(tmp_path, [rec("voc21", 1.0 + g, *PAPER, f"method.gamma={g}") for g in (2.0, 4.0)])
    assert main([str(root), "--rows", "beta", "--cols", "method.gamma"]) == 0
    out = capsys.readouterr().out
    assert md_rows(out) == [["beta", "gamma=2.0", "gamma=4.0"], ["1.2", "3.0", "5.0"]]
    assert (root / "summary.md").read_text() == out.split("(written to")[0]
    assert main([str(root), "--rows", "nope", "--cols", "gamma"]) == 2
    assert "unknown field 'nope'" in capsys.readouterr().err


def test_default_kind_is_the_presets_and_summary_files_are_written(tmp_path):
    assert default_kind([rec("voc21", 1.0, experiment="paper_vfm")]) == "vfm"
    assert default_kind([rec("voc21", 1.0, experiment="paper_vfm"), rec("voc21", 1.0, experiment="tiny")]) == "main"
    assert default_kind([rec("voc21", 1.0)]) == "main"
    records = [rec("voc21", 50.0 + i, "method=proxyclip", f"clip={c}", "vfm=dino_vits8", experiment="paper_vfm")
               for i, c in enumerate(("vit_b16", "vit_l14"))]
    root = write(tmp_path, records)
    md = summarize([root], tmp_path / "out")
    assert md_rows(md) == [["vfm.name", "clip.name=ViT-B-16", "clip.name=ViT-L-14"], ["dino_vits8", "50.0", "51.0"]]
    assert "All runs" not in md  # the preset's VFM axis is named by its column
    assert (tmp_path / "out" / "summary.md").read_text() == md
    assert (tmp_path / "out" / "summary.csv").read_text().splitlines()[1] == "voc21,dino_vits8,50.0000,51.0000"
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        summarize([root], kind="nope")


def test_cell_text_nan_and_published_only():
    assert cell_text(Cell(math.nan, 61.3)) == "nan" and cell_text(Cell(None, 61.3)) == "(61.3)"
    assert cell_text(Cell(61.3, 61.3)) == "61.3 (61.3, +0.0)" and cell_text(Cell(None)) == "-"


def test_tables_logged_to_wandb_offline_read_back(tmp_path, monkeypatch):
    from test_loggers import read_run

    for k, v in {"WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true", "WANDB_ERROR_REPORTING": "false",
                 "WANDB_DISABLE_CODE": "true", "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
                 "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(k, v)
    from proxyclip.cli.summary import wandb_logger_config

    root = write(tmp_path, [rec("voc21", 61.04, experiment="paper_main")], "r")
    summarize([root], logger_cfg=wandb_logger_config("offline", tmp_path / "w"))
    (run_dir,) = (tmp_path / "w" / "wandb").glob("offline-run-*")
    summary, _ = read_run(str(run_dir))
    assert summary["name"] == "summary-main" and summary["config"]["table"] == "main"
    table = summary["summary"]["summary/main"]
    data = json.loads((run_dir / "files" / table["path"]).read_text())
    assert data["columns"][:8] == ["table"] + HEADER_MAIN + ["VOC21", "VOC21 published", "VOC21 diff"]
    assert data["data"][0][:7] == ["main", "proxyclip", B16, "dino_vitb8", "", 61.04, 61.3]
    assert data["data"][0][7] == pytest.approx(61.04 - 61.3)


# ----------------------------------------------------------------------------------------------
# presets

DATASETS8 = ["voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k"]
PRESETS = {  # preset: (its axes and values, independently written down)
    "paper_main": {"clip": ["vit_b16", "vit_l14", "vit_h14"], "dataset": DATASETS8},
    "paper_vfm": {"vfm": ["dino_vitb8", "dino_vitb16", "dinov2_vitb14_reg", "sam_vitb", "mae_vitb16"],
                  "clip": ["vit_b16", "vit_l14", "vit_h14"], "dataset": DATASETS8},
    "paper_beta_gamma": {"method.beta": ["1.0", "1.2", "1.4", "1.6"], "method.gamma": ["2.0", "3.0", "4.0", "5.0"],
                         "dataset": DATASETS8},
    "paper_norm_mask": {"method.shift": ["True", "False"], "method.mask": ["True", "False"], "dataset": DATASETS8},
    "paper_methods": {"method": ["clip", "maskclip", "sclip", "clearclip", "naclip", "proxyclip", "resclip", "scclip",
                                 "gem", "cass", "lposs", "lposs_plus", "cliper", "trident"], "dataset": DATASETS8},
    "paper_methods_own": {"protocol": ["sclip", "naclip", "clearclip", "proxyclip", "resclip", "scclip", "cass",
                                       "lposs", "cliper", "trident"], "dataset": DATASETS8},
}
# experiment=tiny spelled out: one experiment preset at a time, and this test runs paper_norm_mask
TINY_MODELS = ["clip=test_tiny", "vfm=test_tiny", "weights=random", "protocol.short_side=64", "protocol.crop=64",
               "protocol.stride=32", "batch_size=2", "progress=false", "checkpoint_seconds=0"]
GRID_SIZES = {"paper_main": 24, "paper_vfm": 120, "paper_beta_gamma": 128, "paper_norm_mask": 32, "paper_methods": 112,
              "paper_methods_own": 80}


def compose_eval(overrides):
    from hydra import compose, initialize_config_dir

    from proxyclip.config import CONF_DIR

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("eval", overrides=overrides, return_hydra_config=True)


def sweep_axes(cfg) -> dict:
    """The preset's hydra.sweeper.params, each split by Hydra's own override parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    lines = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    return {o.key_or_group: list(o.sweep_string_iterator()) for o in parser.parse_overrides(lines)}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_declares_the_papers_grid(preset):
    cfg = compose_eval([f"experiment={preset}", "dataset=voc21"])
    axes = sweep_axes(cfg)
    assert axes == PRESETS[preset]
    assert math.prod(len(v) for v in axes.values()) == GRID_SIZES[preset]
    assert cfg.experiment_name == preset and default_kind([{"experiment": preset}]) == preset[len("paper_"):]
    assert cfg.hydra.sweep.dir.startswith(f"multirun/{preset}/")


@pytest.mark.parametrize("preset", ["paper_main", "paper_vfm", "paper_beta_gamma", "paper_norm_mask", "paper_methods"])
def test_preset_composes_at_every_value_of_each_axis(preset):
    """One grid point per axis value (the other axes at their first value): every group option exists
    and every value lands in the config."""
    axes = PRESETS[preset]
    first = {k: v[0] for k, v in axes.items()}
    for key, values in axes.items():
        for value in values:
            point = dict(first, **{key: value})
            cfg = compose_eval([f"experiment={preset}"] + [f"{k}={v}" for k, v in point.items()])
            assert cfg.method.name == point.get("method", "proxyclip") and cfg.experiment_name == preset
            assert cfg.dataset.name == point["dataset"]
            if key.startswith("method."):
                assert cfg.method[key.split(".")[1]] == yaml.safe_load(value)
            elif key in ("clip", "vfm"):  # the chosen option's file, read directly
                assert cfg[key].name == OmegaConf.load(REPO / "conf" / key / f"{value}.yaml").name


def test_methods_own_preset_runs_each_method_under_its_own_protocol():
    for protocol in PRESETS["paper_methods_own"]["protocol"]:
        cfg = compose_eval(["experiment=paper_methods_own", f"protocol={protocol}", "dataset=voc21"])
        assert cfg.method.name == cfg.protocol.name == protocol
        assert cfg.postprocess.name == ("pamr" if protocol == "naclip" else "none")
        assert cfg.clip.name == "ViT-B-16" and cfg.vfm.name == "dino_vitb8"
    # CLIP / MaskCLIP: a method on the command line wins over the one the protocol names
    cfg = compose_eval(["experiment=paper_methods_own", "protocol=sclip", "method=maskclip", "dataset=voc20"])
    assert (cfg.method.name, cfg.protocol.name, cfg.protocol.crop) == ("maskclip", "sclip", 224)


def own(dataset, miou, protocol, *extra, method=None):
    """A record of experiment=paper_methods_own under ``protocol`` (as proxyclip-eval writes it)."""
    overrides = ("experiment=paper_methods_own", f"protocol={protocol}") + ((f"method={method}",) if method else ())
    return rec(dataset, miou, *overrides, *extra, experiment="paper_methods_own", protocol=protocol)


def test_methods_own_table_one_row_a_method_with_its_own_papers_numbers(tmp_path):
    """Under its own protocol a method's per-dataset settings (logit scale, area rule, class file,
    whole-image windows) are its defaults: one row a method; SCLIP's and NACLIP's rows get the
    numbers their READMEs publish for exactly that setup; ClearCLIP's none (no checked source)."""
    records = [own(d, 10.0 + i, p) for p in ("sclip", "naclip", "clearclip") for i, d in enumerate(DATASETS8)]
    table, = tables(tmp_path, records)  # the preset's own kind: methods_own
    assert table.name == "methods_own"
    labels = {row[0][0]: row for row in table.rows}
    assert sorted(labels) == ["clearclip", "naclip", "sclip"] and all(r[0][3] == "" for r in table.rows)
    sclip, naclip, clear = (labels[m][1] for m in ("sclip", "naclip", "clearclip"))
    assert [c.published for c in sclip[:8]] == [59.63, 31.74, 33.52, 81.54, 34.46, 22.77, 32.34, 16.45]
    assert [c.published for c in naclip[:8]] == [64.07, 34.99, 36.19, 83.03, 38.35, 25.69, 38.27, 19.05]
    assert naclip[8].published == 42.46 and all(c.published is None for c in clear)
    md = to_markdown([table])
    assert "SCLIP README" in md and "not the SCLIP paper's numbers" in md and "PAMR on" in md


@pytest.mark.parametrize("case", ["sclip under proxyclip's protocol", "sclip protocol + pamr", "crop 336",
                                  "naclip without pamr", "proxyclip's class file"])
def test_methods_own_numbers_only_for_the_same_specs(tmp_path, case):
    from proxyclip.evaluation.published import COLLECTIONS, OWN_PROTOCOL_B16

    r = {"sclip under proxyclip's protocol": lambda: own("voc21", 1.0, "proxyclip", method="sclip"),
         "sclip protocol + pamr": lambda: own("voc21", 1.0, "sclip", "postprocess=pamr_naclip"),
         "crop 336": lambda: own("voc21", 1.0, "sclip", "protocol.crop=336"),
         "naclip without pamr": lambda: own("voc21", 1.0, "naclip", "postprocess=none"),
         "proxyclip's class file": lambda: own("voc21", 1.0, "sclip", "dataset.classnames=voc21")}[case]()
    got = find_published(collect([write(tmp_path, [r])]), COLLECTIONS["methods_own"])
    assert got not in OWN_PROTOCOL_B16
    right = own("voc21", 1.0, "naclip" if case.startswith("naclip") else "sclip")
    assert find_published(collect([write(tmp_path, [right], "ok")]), COLLECTIONS["methods_own"]) in OWN_PROTOCOL_B16


# ----------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_norm_mask_preset_runs_on_fixture_data_then_summary_prints_the_2x2(tmp_path):
    from fixtures_datasets import make_voc

    make_voc(tmp_path, n=2)
    mr = tmp_path / "mr"
    env = subprocess_env()
    r = subprocess.run([PYTHON, "-m", "proxyclip.cli.evaluate", "-m", "experiment=paper_norm_mask", "dataset=voc21",
                        f"data_root={tmp_path}", *TINY_MODELS, f"hydra.sweep.dir={mr}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(mr.rglob("metrics.json"))
    assert len(runs) == 4  # 2 x 2, one dataset
    assert {json.loads(p.read_text())["experiment"] for p in runs} == {"paper_norm_mask"}
    s = subprocess.run([PYTHON, "-m", "proxyclip.cli.summary", str(mr)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert s.returncode == 0, s.stderr
    rows = md_rows(s.stdout)
    # shift/mask do not change the computation on this branch yet: the layout only
    assert rows[0] == ["shift", "mask=off", "mask=on"] and [r[0] for r in rows[1:]] == ["off", "on"]
    assert all(len(r) == 3 and r[1] != "-" and r[2] != "-" for r in rows[1:])
    assert "mIoU (%) on VOC21" in s.stdout
    (shared,) = [ln for ln in s.stdout.splitlines() if ln.startswith("- All runs: ")]
    assert "weights.source=random" in shared and "protocol.crop=64" in shared
    assert (mr / "summary.md").read_text() == s.stdout.split("(written to")[0]
    assert len((mr / "summary.csv").read_text().splitlines()) == 3


@pytest.mark.slow
def test_methods_own_preset_runs_on_fixture_data_then_summary_prints_a_row_a_method(tmp_path):
    """paper_methods_own end to end (tiny models, short side 64 so the presets' windows stay
    theirs): each run records its protocol and that protocol's VOC21 settings; one row a method."""
    from fixtures_datasets import make_voc

    make_voc(tmp_path, n=2)
    mr = tmp_path / "mr"
    env = subprocess_env()
    r = subprocess.run([PYTHON, "-m", "proxyclip.cli.evaluate", "-m", "experiment=paper_methods_own", "dataset=voc21",
                        "protocol=sclip,naclip,clearclip,proxyclip",  # the original four (the grid has 8)
                        f"data_root={tmp_path}", "clip=test_tiny", "vfm=test_tiny", "weights=random",
                        "protocol.short_side=64", "batch_size=2", "progress=false", "checkpoint_seconds=0",
                        f"hydra.sweep.dir={mr}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = {json.loads(p.read_text())["protocol"]: json.loads(p.read_text()) for p in mr.rglob("metrics.json")}
    assert sorted(runs) == ["clearclip", "naclip", "proxyclip", "sclip"]
    got = {p: (r["decode"]["method"], r["encode"]["protocol"]["crop"], r["decode"]["logit_scale"],
               r["decode"].get("area_thd"), r["decode"]["postprocess"]["name"], r["selection"]["classnames"])
           for p, r in runs.items()}
    assert got == {"sclip": ("sclip", 224, 65.0, 0.1, "none", "sclip/voc21"),
                   "naclip": ("naclip", None, 40.0, None, "pamr", "naclip/voc21"),
                   "clearclip": ("clearclip", 448, 50.0, None, "none", "clearclip/voc21"),
                   "proxyclip": ("proxyclip", 336, 40.0, None, "none", "voc21")}
    s = subprocess.run([PYTHON, "-m", "proxyclip.cli.summary", str(mr)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert s.returncode == 0, s.stderr
    rows = md_rows(s.stdout)
    assert "methods_own: mIoU (%)" in s.stdout
    assert [r[0] for r in rows[1:]] == ["sclip", "clearclip", "naclip", "proxyclip"]
    assert all(r[3] == "" for r in rows[1:])  # each at its own protocol's defaults
