"""The text-embedding disk cache: a new process gets every embedding from it; keys separate models,
templates and names; a corrupt entry is reported in one line and recomputed."""

import subprocess
import sys

import pytest
import torch

from conftest import TINY
from fixtures_eval import REPO, subprocess_env
from proxyclip import Segmenter, compose_config
from proxyclip.text import TextDiskCache, default_text_cache_dir, text_cache_options

NAMES = ["sky", "grass, lawn", "person", "horse"]

# a fresh process: build the tiny segmenter with the cache in argv[1], embed NAMES, report hits/misses
CHILD = """
import sys, torch
from proxyclip import Segmenter, compose_config
seg = Segmenter.from_config(compose_config(overrides=["experiment=tiny", f"text_cache={sys.argv[1]}"]))
emb = seg.text_embeddings(%r)
torch.save(emb, sys.argv[2])
print("hits", seg.text.disk.hits, "misses", seg.text.disk.misses)
""" % (NAMES,)


def run_child(cache, out):
    r = subprocess.run([sys.executable, "-c", CHILD, str(cache), str(out)], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_second_process_reads_every_embedding_from_disk(tmp_path):
    cache = tmp_path / "text"
    assert "hits 0 misses 4" in run_child(cache, tmp_path / "a.pt")
    assert len(list(cache.glob("*.pt"))) == 4 and not list(cache.glob(".tmp-*"))
    assert "hits 4 misses 0" in run_child(cache, tmp_path / "b.pt")
    assert torch.equal(torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt"))


def test_cached_embeddings_equal_fresh_ones_and_keys_separate_models(tmp_path):
    fresh = Segmenter.from_config(compose_config(overrides=TINY + ["text_cache=null"]))
    assert fresh.text.disk is None
    first = Segmenter.from_config(compose_config(overrides=TINY + [f"text_cache={tmp_path}"]))
    expected = fresh.text_embeddings(NAMES)
    torch.testing.assert_close(first.text_embeddings(NAMES), expected, rtol=0, atol=0)
    second = Segmenter.from_config(compose_config(overrides=TINY + [f"text_cache={tmp_path}"]))
    assert torch.equal(second.text_embeddings(NAMES), expected) and second.text.disk.hits == 4
    # another seed is another model: nothing shared
    other = Segmenter.from_config(compose_config(overrides=TINY + [f"text_cache={tmp_path}", "weights.seed=1"]))
    other.text_embeddings(NAMES)
    assert other.text.disk.hits == 0 and len(list(tmp_path.glob("*.pt"))) == 8
    assert not torch.allclose(other.text_embeddings(NAMES), expected)


def test_model_identity_names_the_weights(tmp_path):
    cfg = compose_config(overrides=TINY)
    ids = {text_cache_options(cfg, random_weights=True)["model_id"]}
    ckpt = tmp_path / "clip.pt"
    ckpt.write_bytes(b"weights A")
    local = compose_config(overrides=TINY + ["weights=local", f"clip.checkpoint={ckpt}"])
    ids.add(text_cache_options(local, random_weights=False)["model_id"])
    ckpt.write_bytes(b"weights B")  # same path, other content: another identity
    ids.add(text_cache_options(local, random_weights=False)["model_id"])
    ids.add(text_cache_options(compose_config(overrides=TINY + ["weights=pretrained"]), random_weights=False)["model_id"])
    assert len(ids) == 4
    assert text_cache_options(compose_config(overrides=TINY + ["text_cache=null"]), True) == {}


def test_default_folder_is_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_text_cache_dir() == tmp_path / "proxyclip" / "text"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_text_cache_dir() == tmp_path / "home" / ".cache" / "proxyclip" / "text"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_name"])
def test_corrupt_entry_is_reported_once_and_recomputed(tmp_path, capsys, damage):
    disk = TextDiskCache(tmp_path, "model-x")
    emb = torch.nn.functional.normalize(torch.randn(8), dim=0)
    disk.put("horse", emb)
    p = disk.path("horse")
    if damage == "truncate":
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif damage == "garbage":
        p.write_bytes(b"not a torch file")
    else:
        torch.save({"name": "zebra", "model_id": "model-x", "embedding": emb}, p)
    assert disk.get("horse") is None
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln]
    assert len(lines) == 1 and "text cache" in lines[0] and str(p) in lines[0] and "recomputing 'horse'" in lines[0]
    disk.put("horse", emb)  # the recomputed value replaces it
    assert torch.equal(disk.get("horse"), emb)
