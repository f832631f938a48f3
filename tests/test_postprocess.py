"""PAMR (docs/methods.md) against a naive per-pixel loop, and as a decode stage."""

import math

import torch

from proxyclip.postprocess import pamr

CLASSES = ["sky", "person; people", "horse"]


def naive_pamr(scores, guide, steps, dilations):
    """Per pixel, per neighbour, float64; replicate padding = clamped coordinates."""
    q, h, w = scores.shape
    c = guide.shape[0]
    img = guide.double()
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]

    def at(y, x):
        return min(max(y, 0), h - 1), min(max(x, 0), w - 1)

    alpha = torch.zeros(h, w, 8 * len(dilations), dtype=torch.float64)
    nbrs = [[None] * w for _ in range(h)]
    for y in range(h):
        for x in range(w):
            pts = [at(y + dy * d, x + dx * d) for d in dilations for dy, dx in offsets]
            stencil = []
            for d in dilations:
                stencil.append((y, x))
                stencil += [at(y + dy * d, x + dx * d) for dy, dx in offsets]
            sigma = []
            for ch in range(c):
                vals = [float(img[ch, a, b]) for a, b in stencil]
                mean = sum(vals) / len(vals)
                sigma.append(math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)))
            logits = []
            for a, b in pts:
                logits.append(sum(-abs(float(img[ch, y, x] - img[ch, a, b])) / (1e-8 + 0.1 * sigma[ch])
                                  for ch in range(c)) / c)
            alpha[y, x] = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
            nbrs[y][x] = pts
    m = scores.double().clone()
    for _ in range(steps):
        new = torch.zeros_like(m)
        for y in range(h):
            for x in range(w):
                for j, (a, b) in enumerate(nbrs[y][x]):
                    new[:, y, x] += alpha[y, x, j] * m[:, a, b]
        m = new
    return m


def test_pamr_equals_a_naive_loop():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(3, 6, 7, generator=g)
    guide = torch.rand(3, 6, 7, generator=g)
    guide[:, :3] += 2.0  # an edge the refinement must respect
    out = pamr(scores, guide, steps=3, dilations=[1, 2])
    torch.testing.assert_close(out.double(), naive_pamr(scores, guide, 3, [1, 2]), atol=1e-5, rtol=1e-5)
    # dilations larger than the image still work (replicate padding)
    big = pamr(scores, guide, steps=2, dilations=[8, 16])
    torch.testing.assert_close(big.double(), naive_pamr(scores, guide, 2, [8, 16]), atol=1e-5, rtol=1e-5)


def test_pamr_properties():
    g = torch.Generator().manual_seed(4)
    guide = torch.rand(3, 9, 9, generator=g)
    const = torch.full((2, 9, 9), 0.3)
    torch.testing.assert_close(pamr(const, guide, 5, [1, 2]), const)  # weights sum to 1: constants stay
    s = torch.rand(2, 9, 9, generator=g)
    assert torch.equal(pamr(s, guide, 0, [1]), s)


def test_pamr_as_a_decode_stage(tiny_segmenter, rand_image):
    seg = tiny_segmenter
    enc = seg.encode(rand_image)
    plain = seg.decode(enc, CLASSES)
    pred, cache = seg.run_with_cache(enc, CLASSES, names=["scores.image", "scores.refined"], postprocess="pamr")
    assert pred.params["postprocess"] == {"name": "pamr", "steps": 10, "dilations": [8, 16]}  # conf/postprocess/pamr.yaml
    torch.testing.assert_close(cache["scores.image"], plain.scores)  # the raw merge is unchanged
    assert torch.equal(cache["scores.refined"], pred.scores)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    guide = (rand_image - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(pred.scores, pamr(plain.scores, guide, 10, [8, 16]))
    talk = seg.decode(enc, CLASSES, postprocess={"name": "pamr", "dilations": [1, 2]})  # other settings: pamr.yaml's
    assert talk.params["postprocess"]["dilations"] == [1, 2] and talk.params["postprocess"]["steps"] == 10
    preset = seg.decode(enc, CLASSES, postprocess="pamr_talk2dino")
    assert preset.params["postprocess"] == {"name": "pamr", "steps": 10, "dilations": [1, 2, 4, 8, 12, 24]}
    none = seg.decode(enc, CLASSES, postprocess={"name": "pamr", "steps": 0})
    torch.testing.assert_close(none.scores, plain.scores)


def test_every_preset_resolves_to_its_yaml(tiny_segmenter):
    """decode's post-process settings for each conf/postprocess preset are that file's values."""
    from omegaconf import OmegaConf

    from proxyclip.config import CONF_DIR
    from proxyclip.postprocess import POSTPROCESSES

    for path in sorted((CONF_DIR / "postprocess").glob("*.yaml")):
        yaml = OmegaConf.to_container(OmegaConf.load(path))
        yaml.pop("defaults", None)
        spec = tiny_segmenter.decode_spec(postprocess=path.stem)
        assert spec.postprocess_settings == yaml and set(yaml) == {"name", *POSTPROCESSES[yaml["name"]].settings}
