"""Every config combination composes; typos and wrong types are errors, not silent defaults."""

import itertools
import re

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from proxyclip import compose_config
from proxyclip.config import CONF_DIR
from proxyclip.methods import METHODS
from proxyclip.postprocess import POSTPROCESSES

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())  # every config group: a folder of conf/


def group(name):
    return sorted(p.stem for p in (CONF_DIR / name).glob("*.yaml") if not p.stem.startswith("_"))  # _x: shared parts


def _expand(pattern):
    """``dino_vit{s,b}{8,16}`` -> the four names it stands for."""
    m = re.search(r"\{([^}]*)\}", pattern)
    if not m:
        return [pattern]
    return [n for alt in m.group(1).split(",") for n in _expand(pattern[:m.start()] + alt + pattern[m.end():])]


def test_groups_hold_the_documented_choices():
    """conf/method holds the registered methods; every weights YAML is the source of its name; the
    README's config table names every choice of each group it lists."""
    assert set(group("method")) == set(METHODS)
    assert {compose_config(overrides=[f"postprocess={p}"]).postprocess.name for p in group("postprocess")} <= set(
        POSTPROCESSES)
    for w in group("weights"):
        assert compose_config(overrides=[f"weights={w}"]).weights.source == w
    readme = (CONF_DIR.parent / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)/` \| (.*) \|$", readme, flags=re.M))
    assert {"clip", "vfm", "weights", "method", "postprocess", "experiment"} <= set(rows) <= set(GROUPS)
    for name, row in rows.items():
        listed = {n for token in re.findall(r"`([^`]+)`", row) for n in _expand(token)}
        missing = sorted(set(group(name)) - listed)
        assert not missing, f"README's config table row {name}/ does not name {missing}"


def test_every_combination_composes():
    # every clip and every vfm choice at least once, with each weights choice in turn (the groups are
    # independent schemas: the full clip x vfm product, 168 compositions, took 40 s and checked no more)
    clips, vfms, weights = group("clip"), group("vfm"), group("weights")
    n = max(len(clips), len(vfms))
    for i in range(n):
        clip, vfm, w = clips[i % len(clips)], vfms[i % len(vfms)], weights[i % len(weights)]
        cfg = compose_config("config", [f"clip={clip}", f"vfm={vfm}", f"weights={w}"])
        assert cfg.clip.name and (cfg.vfm.timm_name is None) == (vfm == "none")
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # nothing left unset


def test_every_method_and_postprocess_composes():
    for method, post in itertools.product(group("method"), group("postprocess")):
        cfg = compose_config("config", [f"method={method}", f"postprocess={post}"])
        assert cfg.method.name == method and cfg.postprocess.name in POSTPROCESSES
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_segment_config_takes_every_choice():
    # the segment config shares the groups: each choice once (the full product is checked above)
    defaults = OmegaConf.load(CONF_DIR / "segment.yaml").defaults
    groups = [k for d in defaults if OmegaConf.is_dict(d) for k in d]
    assert {"clip", "vfm", "weights", "method", "protocol", "postprocess", "logger"} <= set(groups) <= set(GROUPS)
    compose_config("segment", ["experiment=tiny"])  # the paper_* experiments are eval/sweep presets
    for name in (g for g in groups if g != "experiment"):
        for choice in group(name):
            cfg = compose_config("segment", [f"{name}={choice}"])
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_paper_defaults_live_in_conf():
    cfg = compose_config()
    m, p = cfg.method, cfg.protocol
    assert (m.beta, m.gamma, m.logit_scale, p.crop, p.stride, p.short_side) == (1.2, 3.0, 40.0, 336, 112, 336)
    assert (p.max_long_side, p.prob_thd) == (2048, 0.0)
    cfg = compose_config(overrides=["clip=vit_h14", "vfm=sam_vitb"])
    assert (cfg.clip.name, cfg.clip.pretrained, cfg.vfm.input_size) == ("ViT-H-14", "laion2b_s32b_b79k", 1024)


def test_typos_and_wrong_types_are_errors():
    with pytest.raises(ConfigCompositionException, match="gama"):
        compose_config(overrides=["method.gama=2"])
    with pytest.raises((ConfigCompositionException, ValidationError), match="beta"):
        compose_config(overrides=["method.beta=abc"])
    with pytest.raises((ConfigCompositionException, ValidationError), match="crop"):
        compose_config(overrides=["protocol.crop=abc"])
    with pytest.raises(ConfigCompositionException, match="crop"):
        compose_config(overrides=["method.crop=224"])  # geometry moved to protocol.*
    with pytest.raises(ConfigCompositionException, match="clip/vit_z99"):
        compose_config(overrides=["clip=vit_z99"])


def test_device_and_precision_auto_resolve_for_this_machine(monkeypatch):
    import torch

    from proxyclip.devices import resolve_device, resolve_precision, resolve_runtime

    cfg = compose_config("config", ["experiment=tiny"])
    assert (cfg.device, cfg.precision) == ("auto", "auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_runtime(cfg) == (torch.device(expected), "fp16" if expected == "cuda" else "fp32")
    assert (cfg.device, cfg.precision) == (expected, "fp16" if expected == "cuda" else "fp32")  # written back
    # as on a GPU machine, and as on a CPU-only one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_precision("auto", torch.device("cuda")) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_precision("auto", torch.device("cpu")) == "fp32"
    # explicit values are kept; impossible ones are one clear error
    explicit = compose_config("config", ["experiment=tiny", "device=cpu", "precision=bf16"])
    assert resolve_runtime(explicit) == (torch.device("cpu"), "bf16")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(ValueError, match="precision must be auto or one of"):
        resolve_precision("fp64", torch.device("cpu"))
    with pytest.raises(ValueError, match="device must be auto, cpu"):
        resolve_device("gpu")


def test_segmenter_saves_the_resolved_device_and_precision(tiny_segmenter):
    from proxyclip import Segmenter

    seg = tiny_segmenter
    assert seg.cfg.device in ("cpu", "cuda") and seg.cfg.precision in ("fp32", "fp16")
    # the same key (feature caches, resumable state) as a config that names those values explicitly
    explicit = compose_config("config", ["experiment=tiny", f"device={seg.cfg.device}",
                                         f"precision={seg.cfg.precision}"])
    assert Segmenter(explicit, seg.clip, seg.vfm, seg.random_weights).key == seg.key


def test_another_packages_hydra_does_not_hide_the_method_yamls(tmp_path):
    """``group_choice`` (a decode with another method's YAML) under a global Hydra that is not ours
    (importing sam2 initializes one with sam2's configs, masks=sam2): it still reads conf/method/."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from proxyclip.config import group_choice

    (tmp_path / "other.yaml").write_text("x: 1\n")  # a foreign config folder without our config.yaml
    group_choice.cache_clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(tmp_path)):
            assert GlobalHydra.instance().is_initialized()
            node = group_choice("method", "lposs")
        assert node.name == "lposs" and node.k == OmegaConf.load(CONF_DIR / "method" / "lposs.yaml").k == 400
    finally:
        group_choice.cache_clear()
