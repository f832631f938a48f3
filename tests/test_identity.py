"""One identity: every field of the encode spec, the decode spec and the selection tells runs apart.

Parametrized over the fields of real specs (flattened records), so a field added to a spec is
covered here by itself: changing that one field changes the key, the W&B config and the feature-cache
part it belongs to, and makes a resume refuse with a message naming the field.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from conftest import tiny_config

from proxyclip.evaluation.outputs import wandb_config
from proxyclip.evaluation.runner import fingerprint
from proxyclip.evaluation.state import RunState
from proxyclip.resolve import decode_spec
from proxyclip.specs import DecodeSpec, EncodeSpec, flatten

# every encode part present: CLIP, VFM, mask proposals; the area rule on (it is left out of the record when off)
CFG = tiny_config("postprocess=pamr", "protocol.area_thd=0.1", "masks=sam2")
ENCODE = EncodeSpec.from_config(CFG, random_weights=False, uses_vfm=True)
DECODE = decode_spec(CFG, classes=["sky", "tree; bush"])
SELECTION = {"dataset": "voc21", "num_samples": 3, "samples": "abc", "limit": None, "limit_seed": None,
             "classnames": "voc21", "background": None, "reduce_zero_label": False, "ignore_index": 255}
RECORD = {"encode": ENCODE.record(), "decode": DECODE.record(), "selection": SELECTION}


def _perturbed(value):
    """Another value of the same field (a type-preserving change)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.5
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value + [1]
    return "x"  # None


def _set(record: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(record)
    node = out
    *path, last = dotted.split(".")
    for p in path:
        node = node[p]
    node[last] = value
    return out


FIELDS = sorted(flatten(RECORD))
# Trident with its SAM refinement: the SAM part (with the image embedding; weights=pretrained: the
# decoder's URL in the identity) and sam_refine's settings; only the fields the first record lacks
CFG_SAM = tiny_config("method=trident", "postprocess=sam_refine", "weights=pretrained")
ENCODE_SAM = EncodeSpec.from_config(CFG_SAM, random_weights=False, uses_vfm=True)
DECODE_SAM = decode_spec(CFG_SAM, classes=["sky", "tree; bush"])
RECORD_SAM = {"encode": ENCODE_SAM.record(), "decode": DECODE_SAM.record(), "selection": SELECTION}
BASES = {"pamr": (RECORD, ENCODE, DECODE), "sam_refine": (RECORD_SAM, ENCODE_SAM, DECODE_SAM)}
CASES = [("pamr", f) for f in FIELDS] + [("sam_refine", f) for f in sorted(flatten(RECORD_SAM)) if f not in FIELDS]


def test_every_spec_field_is_listed():
    """The parametrization reaches every leaf of the three records (vfm included, not None)."""
    assert any(f.startswith("encode.vfm.") for f in FIELDS) and "decode.postprocess.dilations" in FIELDS
    assert "decode.area_thd" in FIELDS and "decode.logit_scale" in FIELDS and "encode.protocol.crop" in FIELDS
    assert "encode.masks.points_per_side" in FIELDS and "encode.masks.dir" in FIELDS
    assert {f.split(".")[0] for f in FIELDS} == {"encode", "decode", "selection"}
    assert len(FIELDS) == len(flatten(ENCODE.record())) + len(flatten(DECODE.record())) + len(SELECTION)
    sam = {f for b, f in CASES if b == "sam_refine"}
    assert {"encode.sam.embedding", "encode.sam.decoder", "encode.sam.name", "decode.postprocess.coarse_thresh",
            "decode.postprocess.sam_iou_thresh", "decode.postprocess.minimal_area",
            "decode.postprocess.sam_mask_coff"} <= sam


@pytest.mark.parametrize("base,field", CASES)
def test_changing_one_field_changes_the_identity(base, field, tmp_path):
    RECORD, ENCODE, DECODE = BASES[base]
    old = flatten(RECORD)[field]
    changed = _set(RECORD, field, _perturbed(old))
    enc, dec = EncodeSpec.from_record(changed["encode"]), DecodeSpec.from_record(changed["decode"])
    if field == "encode.sam.embedding":  # off: left out of the record (the keys of parts without it stay)
        del changed["encode"]["sam"]["embedding"]
    assert enc.record() == changed["encode"] and dec.record() == changed["decode"]  # the records round-trip
    part, name = field.split(".", 1)
    if part == "encode":
        assert enc.key() != ENCODE.key()
        parts_changed = (enc.clip_key != ENCODE.clip_key, enc.vfm_key != ENCODE.vfm_key,
                         enc.masks_key != ENCODE.masks_key, enc.sam_key != ENCODE.sam_key)
        if name in ("parts", "sam.decoder"):  # extra parts get keys of their own; they do not change CLIP's or
            assert parts_changed == (False, False, False, False)  # the VFM's part; the decoder is decode-time
        elif name.startswith("masks."):  # the proposals' own cache key; CLIP's and the VFM's parts are reused
            assert parts_changed == (False, False, True, False)
        elif name.startswith("sam."):  # the SAM part's own cache key
            assert parts_changed == (False, False, False, True)
        else:  # the feature cache folder of the part this field belongs to changes
            assert any(parts_changed), f"{field} reaches no feature-cache key"
            if name.startswith("vfm."):
                assert parts_changed == (False, True, False, False)  # CLIP's cached part is still reused
    if part == "decode":
        assert dec.key() != DECODE.key()
    # the W&B config of the two runs differs in that field
    record = {"dataset": "voc21", "encode": enc.record(), "selection": changed["selection"]}
    base = {"dataset": "voc21", "encode": ENCODE.record(), "selection": SELECTION}
    assert wandb_config(record, "eval", dec.record()) != wandb_config(base, "eval", DECODE.record())
    # a saved state of the first run is not continued by the second, and the message names the field
    seg = types.SimpleNamespace(encode_spec=ENCODE)
    first = RunState(tmp_path, 0, 1, fingerprint(seg, [DECODE], SELECTION), (1, 2, 2))
    first.add("img0", torch.ones(1, 2, 2, dtype=torch.int64))
    first.save()
    second = RunState(tmp_path, 0, 1, fingerprint(types.SimpleNamespace(encode_spec=enc), [dec], changed["selection"]),
                      (1, 2, 2))
    with pytest.raises(RuntimeError, match=rf"\({field}: .* then, .* now\).*not continued.*resume=false"):
        second.load()


def test_the_same_settings_resume(tmp_path):
    seg = types.SimpleNamespace(encode_spec=ENCODE)
    first = RunState(tmp_path, 0, 1, fingerprint(seg, [DECODE], SELECTION), (1, 2, 2))
    first.add("img0", torch.ones(1, 2, 2, dtype=torch.int64))
    first.save()
    again = RunState(tmp_path, 0, 1, fingerprint(seg, [decode_spec(CFG, classes=["sky", "tree; bush"])],
                                                 dict(SELECTION)), (1, 2, 2))
    assert again.load() and again.done == ["img0"] and int(again.cm.sum()) == 4
