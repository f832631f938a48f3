"""One VFM forward, every readout (proxyclip/backbones/readout_memo.py): a second backbone on the same
model and input reads what the first forward made, equal to running the model; any difference in the
input, the layer, the weights or a listener makes the model run again."""

import copy

import pytest
import timm
import torch

from proxyclip import Segmenter, compose_config
from proxyclip.backbones import readout_memo
from proxyclip.backbones.blocks import BlockPoints, VFM_POINTS
from proxyclip.backbones.vfm import VfmBackbone
from proxyclip.hooks import HookSet

@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():  # as an encode runs; with gradients on the memo is not used (tested below)
        yield


READOUTS = [("tokens", True), ("tokens", False), ("q", True), ("k", True), ("v", True), ("qk", True)]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_small_patch16_224.dino", pretrained=False, embed_dim=64, depth=2, num_heads=2,
                             dynamic_img_size=True).eval()


def counting(model):
    calls = []
    model.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    return calls


def direct(model, feature, norm, x, layer=-1):
    """The readout with no memo: a deep copy of the model without its memo and hooks, run with the memo off."""
    clone = copy.deepcopy(model)
    clone.__dict__.pop(readout_memo._ATTR, None)
    for m in clone.modules():
        m._forward_hooks.clear()
    size, readout_memo.MEMO_BYTES = readout_memo.MEMO_BYTES, 0
    try:
        with torch.no_grad():
            return VfmBackbone(clone, layer=layer, feature=feature, norm=norm).features(x)
    finally:
        readout_memo.MEMO_BYTES = size


@pytest.mark.parametrize("first", READOUTS, ids=lambda r: f"{r[0]}-norm{r[1]}")
@pytest.mark.parametrize("second", READOUTS, ids=lambda r: f"{r[0]}-norm{r[1]}")
def test_a_second_readout_of_the_same_forward_equals_running_the_model(first, second):
    model = tiny_model()
    x = torch.randn(2, 3, 48, 64)
    want = direct(model, *second, x)
    calls = counting(model)
    VfmBackbone(model, feature=first[0], norm=first[1]).features(x)
    got = VfmBackbone(model, feature=second[0], norm=second[1]).features(x)
    assert torch.equal(got, want)
    # one forward serves both, except tokens read with a final-norm flag the first forward did not use
    # (q / k / v forwards read the layer's output without the norm)
    first_norm = first[1] if first[0] == "tokens" else False
    assert len(calls) == (2 if second[0] == "tokens" and second[1] != first_norm else 1)

def test_another_input_layer_or_weights_runs_the_model_again():
    model = tiny_model()
    x = torch.randn(1, 3, 32, 48)
    calls = counting(model)
    tokens, keys = VfmBackbone(model), VfmBackbone(model, feature="k")
    tokens.features(x)
    y = x.clone()
    y[0, 0, 0, 0] += 1e-3
    assert torch.equal(keys.features(y), direct(model, "k", True, y)) and len(calls) == 2
    assert torch.equal(VfmBackbone(model, layer=0, feature="k").features(x), direct(model, "k", True, x, layer=0))
    assert len(calls) == 3
    with torch.no_grad():
        model.blocks[-1].attn.qkv.weight.mul_(2.0)  # in place: the memo's entries are stale
    assert torch.equal(keys.features(x), direct(model, "k", True, x)) and len(calls) == 4


def test_a_listener_on_the_vfm_blocks_makes_the_model_run_and_fire():
    model = tiny_model()
    x = torch.randn(1, 3, 32, 32)
    VfmBackbone(model).features(x)
    calls = counting(model)
    hooks, seen = HookSet(), []
    with hooks.active(hooks={"vfm.blocks.1.resid_post": lambda t, h: seen.append(t.shape)}):
        out = VfmBackbone(model, feature="k").features(x, point=BlockPoints(hooks, points=VFM_POINTS))
    assert len(calls) == 1 and seen and torch.equal(out, direct(model, "k", True, x))


def test_a_read_is_a_copy_and_the_memo_is_bounded(monkeypatch):
    model = tiny_model()
    x = torch.randn(1, 3, 32, 32)
    keys = VfmBackbone(model, feature="k")
    keys.features(x)
    first = keys.features(x)
    first.zero_()
    assert torch.equal(keys.features(x), direct(model, "k", True, x))
    monkeypatch.setattr(readout_memo, "MEMO_BYTES", 0)  # off: every call runs the model
    calls = counting(model)
    keys.features(x)
    keys.features(x)
    assert len(calls) == 2
    monkeypatch.setattr(readout_memo, "MEMO_BYTES", 60_000)  # about one entry of this size
    memo = readout_memo.memo_of(model)
    memo.entries.clear()
    for i in range(4):
        keys.features(x + i)
    assert sum(readout_memo._size(e) for e in memo.entries) <= 60_000 and len(memo.entries) >= 1


def test_a_method_reading_another_readout_decodes_from_one_vfm_forward():
    """CASS (DINO's keys) beside ProxyCLIP (its tokens): the second Segmenter's encode reuses the CLIP
    part and reads the keys from the first encode's forward; its VFM features equal a fresh encode's."""
    seg = Segmenter.from_config(compose_config(overrides=["experiment=tiny", "method=proxyclip"]))
    image = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(1))
    enc = seg.encode(image)
    cass = seg.for_method("cass")
    assert cass is not seg and cass.vfm.model is seg.vfm.model
    calls = counting(seg.vfm.model)
    enc_k = cass.encode(image, reuse=enc)
    assert len(calls) == 0
    fresh = Segmenter.from_config(compose_config(overrides=["experiment=tiny", "method=cass", "vfm.feature=k"]))
    assert torch.equal(enc_k.vfm_features, fresh.encode(image).vfm_features)
    assert enc_k.vfm_key != enc.vfm_key


def test_with_gradients_on_the_model_runs_and_the_graph_is_kept():
    model = tiny_model()
    x = torch.randn(1, 3, 32, 32)
    keys = VfmBackbone(model, feature="k")
    keys.features(x)  # no_grad (the fixture): stored
    calls = counting(model)
    with torch.enable_grad():
        out = keys.features(x)
    assert len(calls) == 1 and out.requires_grad
    assert torch.equal(out.detach(), direct(model, "k", True, x))
