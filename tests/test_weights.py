"""Weights: pretrained fails fast offline, local checkpoints load or are rejected clearly, random is seeded."""

import time

import pytest
import torch
from hydra.errors import ConfigCompositionException

from conftest import tiny_config
from proxyclip import Segmenter, compose_config
from proxyclip.backbones import CheckpointMismatch, WeightsUnavailable
from proxyclip.backbones.clip import create_clip_model
from proxyclip.backbones.vfm import create_vfm_model

CLASSES = ["sky", "grass"]


def test_pretrained_clip_offline_fails_fast_with_advice(monkeypatch):
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable) as info:
        create_clip_model("ViT-B-16", "openai", True, "pretrained")
    message = str(info.value)
    assert "ViT-B-16" in message and "weights=local" in message and "weights=random" in message
    assert time.monotonic() - start < 60  # a hang guard (hub retries take ~46 s each), not a speed test


def test_pretrained_vfm_without_offline_flag_still_fails_fast(monkeypatch):
    # without HF_HUB_OFFLINE the hub probe finds no network and switches huggingface_hub offline
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable, match="vit_small_patch16_224.dino"):
        create_vfm_model("vit_small_patch16_224.dino", "pretrained")
    assert time.monotonic() - start < 60


def test_unknown_pretrained_tag_and_model_names():
    with pytest.raises(ValueError, match="no pretrained tag 'nope'"):
        create_clip_model("ViT-B-16", "nope", False, "pretrained")
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-99'"):
        create_clip_model("ViT-Q-99", "openai", False, "random")
    with pytest.raises(ValueError, match="unknown timm model 'vit_nope_patch3'"):
        create_vfm_model("vit_nope_patch3", "random")
    with pytest.raises(ConfigCompositionException, match="vfm/dino_vitz9"):
        compose_config(overrides=["vfm=dino_vitz9"])


def test_fallback_to_random_says_so(capsys):
    cfg = tiny_config("clip=vit_b16", "weights=pretrained", "weights.fallback_to_random=true")
    seg = Segmenter.from_config(cfg)
    assert seg.random_weights
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "RANDOM weights" in out


def test_local_checkpoints_roundtrip(tmp_path, rand_image):
    ref = Segmenter.from_config(tiny_config("weights.seed=7"))
    torch.save(ref.clip_model.state_dict(), tmp_path / "clip.pt")
    torch.save(ref.vfm_model.state_dict(), tmp_path / "vfm.pth")
    local = Segmenter.from_config(tiny_config("weights=local", f"clip.checkpoint={tmp_path / 'clip.pt'}",
                                              f"vfm.checkpoint={tmp_path / 'vfm.pth'}"))
    assert not local.random_weights
    torch.testing.assert_close(local.predict(rand_image, CLASSES).scores, ref.predict(rand_image, CLASSES).scores)


def test_local_checkpoint_mismatch_and_missing(tmp_path):
    ref = Segmenter.from_config(tiny_config())
    sd = ref.clip_model.state_dict()
    sd.pop("visual.proj")
    sd["visual.extra"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad_clip.pt")
    with pytest.raises(CheckpointMismatch, match="bad_clip.pt.*does not match.*ViT-T-16-test"):
        Segmenter.from_config(tiny_config("weights=local", f"clip.checkpoint={tmp_path / 'bad_clip.pt'}"))
    vfm_sd = {k: v for k, v in ref.vfm_model.state_dict().items() if not k.startswith("blocks.1.")}
    torch.save(ref.clip_model.state_dict(), tmp_path / "clip.pt")
    torch.save(vfm_sd, tmp_path / "bad_vfm.pth")
    with pytest.raises(CheckpointMismatch, match="bad_vfm.pth.*does not match"):
        Segmenter.from_config(tiny_config("weights=local", f"clip.checkpoint={tmp_path / 'clip.pt'}",
                                          f"vfm.checkpoint={tmp_path / 'bad_vfm.pth'}"))
    with pytest.raises(FileNotFoundError, match="clip.checkpoint.*missing.pt"):
        Segmenter.from_config(tiny_config("weights=local", f"clip.checkpoint={tmp_path / 'missing.pt'}"))
    with pytest.raises(ValueError, match="weights=local needs clip.checkpoint"):
        Segmenter.from_config(tiny_config("weights=local"))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="text.pt"):
        Segmenter.from_config(tiny_config("weights=local", f"clip.checkpoint={tmp_path / 'text.pt'}"))


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="protocol.stride"):
        Segmenter.from_config(tiny_config("protocol.stride=100"))
    with pytest.raises(ValueError, match="protocol.crop"):
        Segmenter.from_config(tiny_config("protocol.crop=0"))
    with pytest.raises(ValueError, match="precision"):
        Segmenter.from_config(tiny_config("precision=fp8"))
    with pytest.raises(ValueError, match="weights.source"):
        Segmenter.from_config(tiny_config("weights.source=cloud"))
