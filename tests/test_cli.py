"""proxyclip-segment writes its files; multirun works; bad input is a one-line error; http(s) images load;
the backbones' config mistakes are one clear message; no library chatter."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import TINY
from PIL import Image


def run_cli(tmp_path, *args, multirun=False):
    cmd = [sys.executable, "-m", "proxyclip.cli.segment", *(["-m"] if multirun else []), *TINY, *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_segment_writes_outputs(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "in.png")
    out = tmp_path / "run"
    r = run_cli(tmp_path, f"image={tmp_path / 'in.png'}", "classes=[sky,'person; people',horse]",
                "method.gamma=2.5", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr
    labels = Image.open(out / "labels.png")
    assert labels.mode == "P" and labels.size == (70, 50)
    lab = np.asarray(labels)
    assert lab.max() <= 2
    assert Image.open(out / "overlay.png").size[0] > 100
    shares = json.loads((out / "shares.json").read_text())
    assert list(shares["shares"]) == ["sky", "person; people", "horse"]
    for k, name in enumerate(shares["shares"]):
        assert abs(shares["shares"][name] - float((lab == k).mean())) < 1e-9
    assert shares["random_weights"] is True and shares["decode"]["knobs"]["gamma"] == 2.5
    assert shares["encode"]["vfm"]["name"] == "test_tiny" and shares["encode"]["weights"] == {"source": "random", "seed": 0}
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"]["gamma"] == 2.5 and cfg["vfm"]["name"] == "test_tiny"


@pytest.mark.slow
def test_segment_multirun(tmp_path):
    r = run_cli(tmp_path, "method.gamma=2.0,4.0", "classes=[a,b]", f"hydra.sweep.dir={tmp_path / 'multi'}",
                multirun=True)
    assert r.returncode == 0, r.stderr
    gammas = sorted(json.loads((tmp_path / "multi" / str(i) / "shares.json").read_text())["decode"]["knobs"]["gamma"]
                    for i in range(2))
    assert gammas == [2.0, 4.0]


@pytest.mark.slow
def test_segment_bad_input_is_one_clear_line(tmp_path):
    r = run_cli(tmp_path, f"image={tmp_path / 'missing.jpg'}", "classes=[a,b]", f"hydra.run.dir={tmp_path / 'x'}")
    assert r.returncode == 2
    assert "error: image file not found" in r.stderr and "missing.jpg" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli(tmp_path, "classes=[]", f"hydra.run.dir={tmp_path / 'y'}")
    assert r.returncode == 2 and "class list is empty" in r.stderr


@pytest.mark.slow
def test_segment_logs_to_offline_wandb(tmp_path):
    from test_loggers import read_run

    out = tmp_path / "run"
    r = run_cli(tmp_path, "classes=[sky,'grass; lawn']", "logger=wandb", "logger.mode=offline", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    summary, records = read_run(str(run_dir))
    assert summary["state"] == "finished"
    assert summary["summary"]["random_weights"] is True
    # the shares table holds exactly the rows of shares.json
    shares = json.loads((out / "shares.json").read_text())["shares"]
    table = json.loads((run_dir / "files" / summary["summary"]["shares"]["path"]).read_text())
    assert table["columns"] == ["class", "share"]
    assert [row[0] for row in table["data"]] == list(shares) == ["sky", "grass; lawn"]
    assert [row[1] for row in table["data"]] == pytest.approx(list(shares.values()))
    # the mask is the labels.png map, its class labels the display names
    seg = summary["summary"]["segmentation"]
    mask = np.asarray(Image.open(run_dir / "files" / seg["masks"]["prediction"]["path"]))
    np.testing.assert_array_equal(mask, np.asarray(Image.open(out / "labels.png")))
    labels_cfg = [r["config"]["update"] for r in records if r["type"] == "config"][-1]["_wandb"]["mask/class_labels"]
    assert next(v["value"] for k, v in labels_cfg.items() if k.endswith("prediction")) == {"0": "sky", "1": "grass"}
    overlay = summary["summary"]["overlay"]
    assert overlay["_type"] == "image-file" and overlay["width"] > 100


def _serve(folder):
    """A local HTTP server on 127.0.0.1 serving ``folder`` (a thread; shut down by the caller)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_image_url_is_downloaded(tmp_path):
    from proxyclip.images import ImageError, load_image

    pixels = np.random.default_rng(1).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "cat.png")
    server = _serve(tmp_path)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        t = load_image(f"{base}/cat.png")
        np.testing.assert_allclose(t.permute(1, 2, 0).numpy(), pixels / 255.0, atol=1e-6)  # the PNG's own pixels
        with pytest.raises(ImageError, match=r"nothere\.png: download failed \(HTTP 404"):
            load_image(f"{base}/nothere.png")
        (tmp_path / "notes.txt").write_text("not an image")
        with pytest.raises(ImageError, match="not an image PIL can read"):
            load_image(f"{base}/notes.txt")
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ImageError, match=r"ftp:// URLs are not supported; download the image"):
        load_image("ftp://example.com/cat.png")


def _build(*overrides):
    from conftest import tiny_config

    from proxyclip import Segmenter

    return Segmenter.from_config(tiny_config(*overrides))


def test_vfm_channels_checked_against_the_built_model(tiny_segmenter):
    real = tiny_segmenter.vfm.channels
    with pytest.raises(ValueError) as e:
        _build(f"vfm.channels={real + 1}")
    assert str(e.value).startswith(f"vfm.channels={real + 1}, but vfm=test_tiny as built gives {real} channels")
    assert _build(f"vfm.channels={real}").vfm.channels == real


def test_inherited_timm_kwargs_are_named():
    from conftest import tiny_config

    inherited = dict(tiny_config().vfm.timm_kwargs)
    assert inherited  # the tiny preset's VFM has architecture arguments
    with pytest.raises(ValueError) as e:
        _build("vfm.timm_name=resnet18")
    msg = str(e.value)
    assert "vfm.timm_name=resnet18" in msg and "inherited" in msg and "vfm.timm_kwargs={}" in msg
    assert any(f"'{k}'" in msg for k in inherited) and "\n" not in msg


def test_hf_tokenizer_models_name_the_package(monkeypatch):
    import importlib.util

    import open_clip

    from proxyclip.backbones.clip import check_tokenizer_package

    siglip = [n for n in open_clip.list_models() if "SigLIP" in n]
    assert siglip and (open_clip.get_model_config(siglip[0]).get("text_cfg") or {}).get("hf_tokenizer_name")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else find_spec(name, *a))
    with pytest.raises(ValueError, match=rf"clip.name={siglip[0]} .* needs the Python package 'transformers'"):
        _build(f"clip.name={siglip[0]}")
    check_tokenizer_package("ViT-T-16-test")  # open_clip's own tokenizer: nothing to install


def test_unused_vfm_warns_only_when_the_user_chose_it(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="proxyclip.build"):
        _build("method=naclip")  # the VFM comes from experiment=tiny: no warning
        assert not [r for r in caplog.records if "uses no VFM" in r.getMessage()]
        _build("method=naclip", "vfm=test_tiny_mae")
    warned = [r.getMessage() for r in caplog.records if "uses no VFM" in r.getMessage()]
    assert warned == ["method=naclip uses no VFM: vfm=test_tiny_mae is neither built nor run"]


def test_open_clip_info_chatter_is_silenced_warnings_are_not(caplog):
    import logging

    from proxyclip.backbones.clip import create_tokenizer
    from proxyclip.backbones.weights import quiet_library_logs

    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.INFO)
    try:
        with caplog.at_level(logging.INFO):
            create_tokenizer("ViT-T-16-test")
            _build()
            with quiet_library_logs():
                logging.warning("a library warning")
        root_records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "root"]
        assert root_records == [(logging.WARNING, "a library warning")]
        assert root.level == logging.INFO  # restored
    finally:
        root.setLevel(old)


def test_unwritable_text_cache_falls_back_to_memory_said_once(tmp_path, capsys):
    import torch

    from proxyclip.text import TextDiskCache

    (tmp_path / "a_file").write_text("x")
    cache = TextDiskCache(tmp_path / "a_file" / "tc", "model")
    for name in ("sky", "tree", "road"):
        cache.put(name, torch.ones(4))
        assert cache.get(name) is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "a_file" / "tc") in lines[0] and "text_cache" in lines[0]
    assert "memory only" in lines[0]
