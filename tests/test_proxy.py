"""Proxy attention stages against a naive per-row computation and hand-worked cases."""

import math

import pytest
import torch

from proxyclip import proxy

import naive


def full_attention(features, beta, gamma):
    s = proxy.normalize_affinity(proxy.cosine_affinity(features), beta, gamma)
    return proxy.masked_softmax(s, proxy.affinity_mask(s))


@pytest.mark.parametrize("beta,gamma", [(1.2, 3.0), (0.0, 1.0), (1.6, 5.0)])
def test_attention_matches_naive_loop(beta, gamma):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 8, 3, 4, generator=g) + 0.5  # positive shift: many affinities above the mean
    attn = full_attention(feats, beta, gamma)
    for b in range(2):
        expected = naive.proxy_attention(feats[b], beta, gamma)  # one row at a time, float64
        torch.testing.assert_close(attn[b].double(), expected, atol=1e-5, rtol=1e-5)


def test_mean_is_per_image_not_per_batch():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(1, 6, 3, 3, generator=g)
    b = torch.randn(1, 6, 3, 3, generator=g) * 0.1 + 3  # very different mean affinity
    together = full_attention(torch.cat([a, b]), 1.2, 3.0)
    torch.testing.assert_close(together[0], full_attention(a, 1.2, 3.0)[0])
    torch.testing.assert_close(together[1], full_attention(b, 1.2, 3.0)[0])


def test_constant_features_give_self_attention_not_nan():
    # all tokens equal: S = 1 everywhere, S' = (1 - 1.2) * 3 < 0 everywhere: every row empty
    feats = torch.ones(1, 5, 4, 4)
    attn = full_attention(feats, 1.2, 3.0)
    assert not torch.isnan(attn).any()
    torch.testing.assert_close(attn[0], torch.eye(16))


def test_only_empty_rows_fall_back_to_the_diagonal():
    s = torch.tensor([[[0.5, -1.0, 0.2], [-0.1, -0.3, -2.0], [-1.0, 0.0, -1.0]]])
    mask = proxy.affinity_mask(s)
    expected = torch.tensor([[[True, False, True], [False, True, False], [False, True, False]]])
    assert torch.equal(mask, expected)
    attn = proxy.masked_softmax(s, mask)
    torch.testing.assert_close(attn[0, 0], torch.tensor([math.exp(0.5), 0, math.exp(0.2)]) / (math.exp(0.5) + math.exp(0.2)))
    torch.testing.assert_close(attn[0, 1], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(attn[0, 2], torch.tensor([0.0, 1.0, 0.0]))


@pytest.mark.parametrize("shared", [True, False])
def test_mixing_is_attention_times_values(shared):
    """concat_h(A_h V_h): a pattern shared by all heads (1) or one per head (2), against a loop."""
    from proxyclip.last_block import mix_heads

    g = torch.Generator().manual_seed(3)
    heads = 1 if shared else 2
    attn = torch.softmax(torch.randn(2, heads, 6, 6, generator=g), -1)
    values = torch.randn(2, 6, 4, generator=g)  # (B, T, D), D = 2 heads x 2
    out = mix_heads(attn, values)
    for b in range(2):
        for i in range(6):
            for c in range(4):
                h = 0 if shared else c // 2
                expected = sum(attn[b, h, i, j] * values[b, j, c] for j in range(6))
                torch.testing.assert_close(out[b, i, c], expected)


@pytest.mark.parametrize("kwargs,field", [
    (dict(beta=float("nan")), "beta"), (dict(gamma=0.0), "gamma"), (dict(gamma=-1.0), "gamma"),
    (dict(logit_scale=float("inf")), "logit_scale"), (dict(logit_scale=0.0), "logit_scale"),
    (dict(beta=-0.5), "beta"), (dict(prob_thd=1.5), "prob_thd"),
])
def test_bad_hyperparameters_are_named(kwargs, field):
    from conftest import tiny_config
    from proxyclip.resolve import decode_spec

    cfg = tiny_config()
    assert decode_spec(cfg, method="proxyclip", beta=1.2, gamma=3.0, logit_scale=40.0, prob_thd=0.0).params()[
        "gamma"] == 3.0
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        decode_spec(cfg, method="proxyclip", **kwargs)
