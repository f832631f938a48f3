"""proxyclip-summary's table kinds on hand-made metrics.json records, the paper presets in
conf/experiment/ (composition and grid sizes), and one preset run end to end on fixture data."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess

import pytest
import yaml
from fixtures_eval import PYTHON, REPO, subprocess_env
from omegaconf import OmegaConf

from proxyclip.evaluation.published import (
    METHODS_B16,
    PAPER_DATASETS,
    PAPER_MAIN,
    find_published,
)
from proxyclip.evaluation.summary import (
    build_tables,
    cell_text,
    default_kind,
    summarize,
    to_csv,
    to_markdown,
)

B16, L14 = "ViT-B-16/openai", "ViT-L-14/openai"
HEADER_MAIN = ["method", "CLIP", "VFM", "setting"]


def rec(dataset, miou, method="proxyclip", clip=B16, vfm="dino_vitb8", **fields):
    params = fields.pop("params", {"beta": 1.2, "gamma": 3.0, "logit_scale": 40.0, "prob_thd": 0.0})
    r = {"dataset": dataset, "mIoU": miou, "method": method, "clip": clip, "vfm": vfm, "weights": "pretrained",
         "params": params, "limit": None, "limit_seed": 0, "experiment": None}
    r.update(fields)
    return r


def md_rows(md: str) -> list:
    """The cells of every table row of a markdown table (header and rule lines left out)."""
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


# ----------------------------------------------------------------------------------------------
# published numbers


@pytest.mark.parametrize("row", PAPER_MAIN + METHODS_B16, ids=lambda r: f"{r.label} [{r.source[:6]}]")
def test_published_values_agree_with_the_papers_own_average(row):
    assert len(row.miou) == len(PAPER_DATASETS) == 8
    # the paper averages unrounded values: each value and the average are off by up to 0.05
    assert abs(sum(row.miou) / 8 - row.avg) <= 0.1 + 1e-9
    assert row.source


def test_published_rows_match_on_method_clip_and_vfm():
    assert find_published("proxyclip", B16, "dino_vitb8").label == "ProxyCLIP B/16 + DINO B/8"
    assert find_published("proxyclip", "ViT-H-14/laion2b_s32b_b79k", "dino_vitb8").miou[0] == 65.0
    assert find_published("proxyclip", B16, "dinov2_vitb14_reg") is None  # other VFM: not the paper's row
    assert find_published("proxyclip", "ViT-H-14/openai", "dino_vitb8") is None  # other weights tag
    assert find_published("sclip", B16, "dino_vitb8").label == "SCLIP B/16"  # a method without VFM: any VFM
    assert find_published("clip", B16, "none").miou[0] == 16.4  # main: the ProxyCLIP paper's vanilla CLIP


# ----------------------------------------------------------------------------------------------
# main


def test_main_table_cells_published_diffs_and_averages():
    records = [rec("voc21", 61.04), rec("ade20k", 20.0), rec("voc21", 60.0, clip=L14),
               rec("voc21", 50.0, method="mymethod", vfm="none")]
    (table,) = build_tables(records, "main")
    md = to_markdown([table])
    rows = md_rows(md)
    assert rows[0] == HEADER_MAIN + ["VOC21", "ADE", "avg"]  # datasets present, in the paper's order
    assert [r[:3] for r in rows[1:]] == [["proxyclip", B16, "dino_vitb8"], ["proxyclip", L14, "dino_vitb8"],
                                         ["mymethod", B16, "none"]]
    # B/16: published 61.3 and 20.2; avg (61.04 + 20) / 2 = 40.52 vs (61.3 + 20.2) / 2 = 40.75
    assert rows[1][4:] == ["61.0 (61.3, -0.3)", "20.0 (20.2, -0.2)", "40.5 (40.8, -0.3)"]
    # L/14 has no ADE: its average is over VOC21 only, marked, against the published VOC21 alone
    assert rows[2][4:] == ["60.0 (60.6, -0.6)", "-", "60.0* (60.6, -0.6)"]
    assert rows[3][4:] == ["50.0", "-", "50.0*"]  # no published row for this method
    assert "Published ProxyCLIP B/16 + DINO B/8, ProxyCLIP L/14 + DINO B/8: ProxyCLIP paper (Lan et al., ECCV 2024)" in md

    lines = list(csv.reader(io.StringIO(to_csv([table]))))
    assert lines[0] == ["table"] + HEADER_MAIN + ["VOC21", "VOC21 published", "VOC21 diff", "ADE", "ADE published",
                                                  "ADE diff", "avg", "avg published", "avg diff"]
    b16 = lines[1]
    assert b16[:4] == ["main", "proxyclip", B16, "dino_vitb8"]
    assert [float(x) for x in b16[5:8]] == pytest.approx([61.04, 61.3, 61.04 - 61.3])
    assert [float(x) for x in b16[11:14]] == pytest.approx([40.52, 40.75, 40.52 - 40.75])
    assert lines[3][5:8] == ["50.0000", "", ""] and len(lines) == 4


def test_rows_split_by_swept_parameters_not_by_each_datasets_protocol():
    p = lambda beta, thd: {"beta": beta, "gamma": 3.0, "logit_scale": 40.0, "prob_thd": thd}
    records = [rec("voc21", 60.0, params=p(1.2, 0.2)), rec("context60", 30.0, params=p(1.2, 0.15)),
               rec("voc21", 55.0, params=p(1.0, 0.2)), rec("context60", 25.0, params=p(1.0, 0.15)),
               rec("voc21", 40.0, method="sclip", vfm="none", params={"logit_scale": 65.0, "prob_thd": 0.2}),
               rec("context60", 20.0, method="sclip", vfm="none", params={"logit_scale": 50.0, "prob_thd": 0.15}),
               rec("voc21", 10.0, weights="random(seed 0)", postprocess="pamr")]
    rows = md_rows(to_markdown(build_tables(records, "main")))[1:]
    # prob_thd (and SCLIP's logit_scale) differ only between datasets: not a row of their own
    assert [(r[0], r[3]) for r in rows] == [("sclip", "beta=-"), ("proxyclip", "beta=1.0"), ("proxyclip", "beta=1.2"),
                                            ("proxyclip", "weights=random(seed 0) postprocess=pamr beta=1.2")]
    assert rows[0][4:] == ["40.0 (59.1, -19.1)", "20.0 (30.4, -10.4)", "30.0 (44.8, -14.8)"]
    assert rows[1][4:] == ["55.0 (61.3, -6.3)", "25.0 (35.3, -10.3)", "40.0 (48.3, -8.3)"]
    assert rows[3][4:] == ["10.0", "-", "10.0*"]  # post-processed: the published numbers are without it


def test_all_eight_benchmarks_in_the_papers_column_order():
    records = [rec(d, 10.0 + PAPER_DATASETS.index(d)) for d in reversed(PAPER_DATASETS)]
    rows = md_rows(to_markdown(build_tables(records, "main")))
    assert rows[0][4:] == ["VOC21", "PC60", "Object", "VOC20", "PC59", "Stuff", "City", "ADE", "avg"]
    assert [c.split(" ")[0] for c in rows[1][4:]] == ["10.0", "11.0", "12.0", "13.0", "14.0", "15.0", "16.0", "17.0",
                                                      "13.5"]
    assert rows[1][-1] == "13.5 (42.3, -28.8)"  # against the paper's own average column


def test_paper_flag_all_columns_and_reference_rows_in_paper_order():
    (table,) = build_tables([rec("voc21", 62.0)], "main", paper=True)
    rows = md_rows(to_markdown([table]))
    assert rows[0][4:] == ["VOC21", "PC60", "Object", "VOC20", "PC59", "Stuff", "City", "ADE", "avg"]
    assert [r[0] for r in rows[1:]] == ["CLIP ViT-B/16 (vanilla)", "SCLIP B/16", "NACLIP B/16", "proxyclip",
                                        "ProxyCLIP L/14 + DINO B/8", "ProxyCLIP H/14 (LAION) + DINO B/8"]
    assert rows[4][4:6] == ["62.0 (61.3, +0.7)", "-"] and rows[4][-1] == "62.0* (61.3, +0.7)"
    assert rows[6][3] == "published" and rows[6][4] == "(65.0)" and rows[6][-1] == "(44.4)"


def test_methods_table_rows_in_method_order_with_each_papers_numbers():
    methods = ["naclip", "mymethod", "clip", "proxyclip", "maskclip", "sclip", "clearclip"]
    records = [rec("voc21", 10.0 + i, method=m, vfm="dino_vitb8" if m == "proxyclip" else "none")
               for i, m in enumerate(methods)]
    rows = md_rows(to_markdown(build_tables(records, "methods")))[1:]
    assert [r[0] for r in rows] == ["clip", "maskclip", "sclip", "clearclip", "naclip", "proxyclip", "mymethod"]
    by = {r[0]: r[4] for r in rows}
    assert by["clip"] == "12.0 (18.8, -6.8)"  # CLIP as the SCLIP paper reports it
    assert by["maskclip"] == "14.0 (43.4, -29.4)" and by["clearclip"] == "16.0 (51.8, -35.8)"
    assert by["naclip"] == "10.0 (58.9, -48.9)" and by["mymethod"] == "11.0"
    main = {r[0]: r[4] for r in md_rows(to_markdown(build_tables(records, "main")))[1:]}
    assert main["clip"] == "12.0 (16.4, -4.4)"  # the main table quotes the ProxyCLIP paper's vanilla CLIP


# ----------------------------------------------------------------------------------------------
# grids


def test_vfm_table_mean_over_datasets_and_one_table_a_dataset():
    vals = {("dino_vitb8", B16): (60.0, 20.0), ("dino_vitb8", L14): (62.0, 24.0),
            ("sam_vitb", B16): (50.0, 10.0), ("sam_vitb", L14): (52.0, None)}
    records = [rec(d, v, clip=c, vfm=f) for (f, c), pair in vals.items() for d, v in zip(("voc21", "ade20k"), pair)
               if v is not None]
    records.append(rec("voc21", 1.0, clip="ViT-B-16/openai", vfm="mae_vitb16", limit=10, limit_seed=0))
    tables = build_tables(records, "vfm")
    assert [t.name for t in tables] == ["average", "voc21", "ade20k"]
    rows = md_rows(to_markdown(tables[:1]))
    assert rows[0] == ["VFM", "setting", f"CLIP={B16}", f"CLIP={L14}"]
    assert rows[1] == ["dino_vitb8", "", "40.0", "43.0"]  # (60 + 20) / 2, (62 + 24) / 2
    assert rows[2] == ["sam_vitb", "", "30.0", "52.0*"]  # only VOC21 for L/14
    assert rows[3] == ["mae_vitb16", "limit=10 limit_seed=0", "1.0*", "-"]
    voc = md_rows(to_markdown(tables[1:2]))
    assert [r[2:] for r in voc[1:]] == [["60.0", "62.0"], ["50.0", "52.0"], ["1.0", "-"]]
    md = to_markdown(tables)
    assert md.count("No published numbers for this table in our docs") == 3 and "(" not in "".join(r[2] for r in rows)


def test_beta_gamma_grid_per_dataset_and_mean():
    records = [rec(d, 10 * b + g + k, params={"beta": b, "gamma": g, "logit_scale": 40.0})
               for k, d in enumerate(("voc21", "context59")) for b in (1.6, 1.0, 1.2) for g in (5.0, 2.0)]
    tables = build_tables(records, "beta_gamma")
    assert [t.name for t in tables] == ["average", "voc21", "context59"]
    rows = md_rows(to_markdown(tables))
    assert rows[0] == ["beta", "gamma=2.0", "gamma=5.0"]
    assert rows[1:4] == [["1.0", "12.5", "15.5"], ["1.2", "14.5", "17.5"], ["1.6", "18.5", "21.5"]]
    assert rows[5:8] == [["1.0", "12.0", "15.0"], ["1.2", "14.0", "17.0"], ["1.6", "18.0", "21.0"]]
    assert rows[9][1:] == ["13.0", "16.0"]
    lines = list(csv.reader(io.StringIO(to_csv(tables))))
    assert lines[0] == ["table", "beta", "gamma=2.0", "gamma=5.0"] and len(lines) == 1 + 9
    assert lines[1] == ["average", "1.0", "12.5000", "15.5000"]


def test_norm_mask_two_by_two_and_shared_setting_said_once():
    records = [rec("voc21", 40.0 + 2 * s + m, weights="random(seed 0)",
                   params={"beta": 1.2, "gamma": 3.0, "shift": bool(s), "mask": bool(m)}) for s in (1, 0) for m in (1, 0)]
    (table,) = build_tables(records, "norm_mask")
    md = to_markdown([table])
    assert md_rows(md) == [["shift", "mask=off", "mask=on"], ["off", "40.0", "41.0"], ["on", "42.0", "43.0"]]
    assert "All runs: weights=random(seed 0)." in md


def test_axis_values_missing_from_params_come_from_the_runs_hydra_config(tmp_path):
    for s in (True, False):
        run = tmp_path / f"shift{s}"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(f"method:\n  shift: {str(s).lower()}\n  mask: true\n")
        (run / "metrics.json").write_text(json.dumps(rec("voc21", 30.0 + s, params={"beta": 1.2})))
    md = summarize([tmp_path], kind="norm_mask")
    assert md_rows(md) == [["shift", "mask=on"], ["off", "30.0"], ["on", "31.0"]]


def test_default_kind_is_the_presets_and_summary_files_are_written(tmp_path):
    assert default_kind([rec("voc21", 1.0, experiment="paper_vfm")]) == "vfm"
    assert default_kind([rec("voc21", 1.0, experiment="paper_vfm"), rec("voc21", 1.0, experiment="tiny")]) == "main"
    assert default_kind([rec("voc21", 1.0)]) == "main"
    for i, c in enumerate((B16, L14)):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps(rec("voc21", 50.0 + i, clip=c, vfm="dino_vits8",
                                                                        experiment="paper_vfm")))
    md = summarize([tmp_path], tmp_path / "out")
    assert md_rows(md) == [["VFM", f"CLIP={B16}", f"CLIP={L14}"], ["dino_vits8", "50.0", "51.0"]]
    assert (tmp_path / "out" / "summary.md").read_text() == md
    assert (tmp_path / "out" / "summary.csv").read_text().splitlines()[1] == "voc21,dino_vits8,50.0000,51.0000"
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        summarize([tmp_path], kind="nope")


def test_cell_text_nan_and_published_only():
    from proxyclip.evaluation.summary import Cell

    assert cell_text(Cell(math.nan, 61.3)) == "nan" and cell_text(Cell(None, 61.3)) == "(61.3)"
    assert cell_text(Cell(61.3, 61.3)) == "61.3 (61.3, +0.0)" and cell_text(Cell(None)) == "-"


def test_tables_logged_to_wandb_offline_read_back(tmp_path, monkeypatch):
    from test_loggers import read_run

    for k, v in {"WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true", "WANDB_ERROR_REPORTING": "false",
                 "WANDB_DISABLE_CODE": "true", "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
                 "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(k, v)
    from proxyclip.cli.summary import wandb_logger_config

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.json").write_text(json.dumps(rec("voc21", 61.04, experiment="paper_main")))
    summarize([tmp_path / "r"], logger_cfg=wandb_logger_config("offline", tmp_path / "w"))
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
    "paper_methods": {"method": ["clip", "maskclip", "sclip", "clearclip", "naclip", "proxyclip"],
                      "dataset": DATASETS8},
}
# experiment=tiny spelled out: one experiment preset at a time, and this test runs paper_norm_mask
TINY_MODELS = ["clip=test_tiny", "vfm=test_tiny", "weights=random", "method.short_side=64", "method.crop=64",
               "method.stride=32", "batch_size=2", "progress=false", "checkpoint_seconds=0"]
GRID_SIZES = {"paper_main": 24, "paper_vfm": 120, "paper_beta_gamma": 128, "paper_norm_mask": 32, "paper_methods": 48}


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
    assert "mIoU (%) on VOC21" in s.stdout and "All runs: weights=random(seed 0)." in s.stdout
    assert (mr / "summary.md").read_text() == s.stdout.split("(written to")[0]
    assert len((mr / "summary.csv").read_text().splitlines()) == 3
