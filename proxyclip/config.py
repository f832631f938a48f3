"""Structured (dataclass) schemas for the Hydra configs in ``conf/`` and ``compose_config``.

The schemas give every field its type, so a typo in an override (``method.gama=2``) or a
wrong type (``method.beta=abc``) is an error. A method's and a post-process's knobs are declared
once, where they are registered (``proxyclip.knobs``); their schemas are generated from those
declarations. Default *values* live in ``conf/`` only (one home for each fact); fields below
that are ``MISSING`` must be set by a config file.

Config groups (one folder each in ``conf/``):
    clip/     which open_clip model and tag          (vit_b16, vit_l14, vit_h14)
    vfm/      which vision foundation model (timm)   (dino_vitb8, dinov2_vitb14_reg, sam_vitb, mae_vitb16, none, ...)
    weights/  where weights come from                (pretrained, local, random)
    method/   the last-block method and its knobs    (proxyclip, clip, maskclip, sclip, clearclip, naclip, resclip, lposs, ...)
    protocol/ geometry, decision, class file per dataset (proxyclip, sclip, naclip, clearclip, resclip, lposs, ...),
              and a method's knobs per dataset (``method_knobs``, applied by ``apply_method_knobs``)
    postprocess/  score-map / label refinement       (none, pamr, pamr_naclip, pamr_talk2dino, sam_refine)
    masks/    mask proposals of the whole image      (none, file, sam2, sam)
    dataset/  the data, its classes and its protocol (voc21, ..., custom)
    logger/   experiment logging                     (none, wandb)

Top-level configs: ``config`` (:class:`Config`), ``segment`` (:class:`SegmentConfig`), ``eval``
(:class:`EvalConfig`) and ``sweep`` (:class:`SweepConfig`); all schemas are registered on import.
"""

from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .config_access import config_get, hydra_output_dir, to_container  # noqa: F401  (re-exported)
from . import protocol_resolvers  # noqa: F401  (registers ${per_dataset:...}, ${class_file:...})

CONF_DIR = Path(os.environ.get("PROXYCLIP_CONF_DIR", Path(__file__).resolve().parents[1] / "conf"))


@dataclass
class ClipConfig:
    """An open_clip model: ``open_clip.create_model(name, pretrained=tag)``."""

    name: str = MISSING  # open_clip architecture name, e.g. "ViT-B-16"
    pretrained: str = MISSING  # open_clip pretrained tag, e.g. "openai"
    quick_gelu: bool = False  # OpenAI weights were trained with QuickGELU
    pos_resize: str = MISSING  # position-embedding resize rule: scale_plus_0.1 | size | size_antialias (docs/vfm.md)
    checkpoint: Optional[str] = None  # local checkpoint file, used with weights=local


@dataclass
class VfmConfig:
    """A vision foundation model built with timm (``timm_name: null`` = no VFM); docs/vfm.md."""

    name: str = MISSING  # short key, e.g. "dino_vitb8"
    timm_name: Optional[str] = None  # timm name and pretrained tag, e.g. "vit_base_patch8_224.dino"
    input_size: Optional[int] = None  # fixed square input side (SAM: 1024); None = the window's own size
    layer: int = -1  # feature layer (a ViT block, a Hiera stage); negative counts from the end
    feature: str = "tokens"  # tokens | q | k | v | qk (that block's attention projections, heads concatenated; qk = q + k)
    norm: bool = True  # tokens: apply the model's final norm (SAM: its neck); ignored for q/k/v
    channels: Optional[int] = None  # C of the model's features at these settings (checked when it is built)
    stride: Optional[int] = None  # the full model's stride at this layer (checked by the tests)
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    pos_resize: str = MISSING  # position-embedding resize rule: scale_plus_0.1 | size | size_antialias | none (docs/vfm.md)
    checkpoint: Optional[str] = None  # local checkpoint file, used with weights=local


@dataclass
class WeightsConfig:
    """Where the backbones' weights come from."""

    source: str = MISSING  # pretrained | local | random
    seed: int = 0  # seed for weights=random (identical numbers on every run)
    fallback_to_random: bool = False  # pretrained unavailable -> say so and use random weights


@dataclass
class MethodConfig:
    """The last-block method: its name, the switches every method has, its logit scale; each
    registered method's own knobs are added by a schema generated from its declarations
    (``method/<name>_schema``, :func:`register_schemas`). Values: conf/method/<name>.yaml.
    The methods themselves: ``proxyclip/methods.py`` and docs/methods.md."""

    name: str = MISSING  # a registered method (proxyclip.methods.METHODS)
    residual: bool = MISSING  # last block: Y = X + attention output (else Y = attention output)
    ffn: bool = MISSING  # last block: Z = Y + mlp(ln_2(Y)) (else Z = Y)
    logit_scale: float = MISSING  # class decision: softmax(logit_scale * scores)


@dataclass
class ProtocolConfig:
    """The evaluation protocol: geometry, the class decision's settings and the class-name file
    (docs/protocol.md). ``conf/protocol/<name>.yaml`` (proxyclip = the default, sclip, naclip,
    clearclip) holds a per-dataset table ``datasets`` and the values ``base`` of a dataset the table
    does not list; each field reads that table for the composed ``dataset.name`` (the
    ``per_dataset`` resolver below), so ``protocol.crop=224`` on the command line replaces it.
    """

    name: str = MISSING  # the preset: proxyclip | sclip | naclip | clearclip
    short_side: int = MISSING  # resize so the short side is this long
    max_long_side: int = MISSING  # ... but the long side is at most this long
    crop: Optional[int] = MISSING  # sliding-window size; null = whole-image mode (one window, the resized image)
    stride: Optional[int] = MISSING  # sliding-window stride (ignored when crop is null)
    prob_thd: float = MISSING  # best probability below this -> background (class 0); 0 disables
    logit_scale: Optional[float] = None  # class decision's logit scale; null = the method's (method.logit_scale)
    area_thd: Optional[float] = None  # SCLIP's area rule (docs/protocol.md); null = off
    classnames: Optional[str] = None  # class-name file (e.g. sclip/voc21); null = the dataset's own
    base: Dict[str, Any] = field(default_factory=dict)  # values of a dataset the table does not list
    datasets: Dict[str, Any] = field(default_factory=dict)  # {dataset name: {field: value}}
    # the preset's per-dataset METHOD knobs, {dataset name: {knob: value}}: applied to cfg.method
    # when method.name is one of method_knobs_for (apply_method_knobs; a command-line
    # method.<knob>= wins); method_knobs_for empty = [name], the method of the preset's name
    method_knobs: Dict[str, Any] = field(default_factory=dict)
    method_knobs_for: List[str] = field(default_factory=list)
    # per-dataset post-process settings {dataset: {setting: value}}, for the post-process declaring them
    postprocess_knobs: Dict[str, Any] = field(default_factory=dict)


PROTOCOL_FIELDS = ("short_side", "max_long_side", "crop", "stride", "prob_thd", "logit_scale", "area_thd",
                   "classnames")


@dataclass
class PostprocessConfig:
    """Refinement of the merged score maps before the class decision (conf/postprocess/*.yaml);
    each registered post-process's settings come from a schema generated from its declarations."""

    name: str = "none"  # a registered post-process (proxyclip.postprocess.POSTPROCESSES)


@dataclass
class MasksConfig:
    """Mask proposals, a per-image part of the encode (conf/masks/*.yaml; proxyclip/masks):
    none, file (read from ``dir``), sam2 / sam (an automatic mask generator and its settings)."""

    name: str = "none"  # none | file | sam2 | sam
    dir: Optional[str] = None  # file: folder of <image stem>.npz / .png
    key: str = "instance_mask"  # file: the .npz array's name (CorrCLIP's)
    model: Optional[str] = None  # sam2: a config of the sam2 package (sam2_hiera_l); sam: vit_h | vit_l | vit_b
    pretrained: Optional[str] = None  # weights=pretrained: sam2's hub repo id; sam's download URL
    checkpoint: Optional[str] = None  # weights=local: the generator's checkpoint file
    input_size: Optional[int] = None  # sam2: the model's input side (None = its own 1024; small for tests)
    points_per_side: int = 32  # the generators' settings (their arguments of the same names)
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    multimask_output: bool = True  # sam2 only
    cache: Optional[str] = "auto"  # generators: label-map disk cache; auto = the user's cache folder; null = off


@dataclass
class TridentConfig:
    """Trident's per-image SAM part (proxyclip/sam_attention.py), made for a method with ``needs_sam``."""

    sam: str = "sam_vitb"  # a conf/vfm preset of a timm SAM ViT (samvit_*): sam_vitb, sam_vitl, sam_vith
    checkpoint: Optional[str] = None  # weights=local: the SAM encoder's timm checkpoint file
    halves: bool = False  # SAM on the left and right halves of the image separately (Trident's Cityscapes run)
    # postprocess=sam_refine's prompt encoder / mask decoder (an official SAM checkpoint; proxyclip/sam_refine.py)
    decoder_checkpoint: Optional[str] = None
    decoder_pretrained: str = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"


@dataclass
class DatasetConfig:
    """An evaluation dataset and its protocol (see conf/dataset/ and proxyclip/data/datasets.py).

    Files: ``root/img_dir/<id><img_suffix>`` and ``root/ann_dir/<id><seg_suffix>``; ids from
    ``split_file`` (relative to root) or from listing ``img_dir`` / ``ann_dir`` (``list_from``).
    The protocol values (short side, crop, stride, prob_thd, ...) of each dataset are in the
    protocol preset's table (conf/protocol/), not here; ``classnames`` reads the protocol's class
    file when it names one (``${class_file:<own>}``).
    """

    name: str = MISSING  # short key used in outputs and tables: voc21, context60, ..., custom
    root: Optional[str] = None  # the dataset folder; its expected layout is in conf/dataset/<name>.yaml
    img_dir: str = "images"  # images folder, relative to root
    ann_dir: str = "labels"  # label-map folder, relative to root
    img_suffix: str = ".jpg"  # "auto": any common image extension (custom datasets)
    seg_suffix: str = ".png"
    split_file: Optional[str] = None  # text file of sample ids, relative to root; null = list a folder
    list_from: str = "images"  # images | labels: the folder listed when split_file is null
    recursive: bool = False  # list sub-folders too (Cityscapes' city folders)
    classnames: str = MISSING  # a shipped name (proxyclip/data/classnames/<name>.txt) or a path
    background: Optional[List[str]] = None  # words replacing class 0's line (background-word ablations)
    background_class: bool = False  # class 0 is the background: shown as "background" in metrics and figures
    num_classes: Optional[int] = None  # K, checked against the class file; null = its number of lines
    reduce_zero_label: bool = False  # label 0 -> ignore, k -> k-1 (VOC20, Context59, ADE20K)
    ignore_index: int = 255  # 65535 for the 16-bit Context-459 / ADE-847 maps
    bad_labels: str = "error"  # error | skip: label map of the wrong size or with out-of-range values
    prepare: str = ""  # how to obtain and lay out the data (shown when the root is missing)


@dataclass
class LoggerConfig:
    """Experiment logging: ``none`` or ``wandb`` (modes online / offline / disabled)."""

    name: str = "none"
    mode: str = "disabled"
    project: str = "proxyclip"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    dir: Optional[str] = None


@dataclass
class Config:
    """The core config: backbones, weights, method, and where to run."""

    clip: ClipConfig = MISSING
    vfm: VfmConfig = MISSING
    weights: WeightsConfig = MISSING
    method: MethodConfig = MISSING
    protocol: ProtocolConfig = MISSING
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    masks: MasksConfig = field(default_factory=MasksConfig)  # mask proposals (conf/masks; proxyclip/masks)
    trident: TridentConfig = field(default_factory=TridentConfig)  # Trident's SAM part (proxyclip/sam_attention.py)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (auto: cuda when available)
    precision: str = "auto"  # auto | fp32 | fp16 | bf16 (backbones; auto: fp16 on CUDA, fp32 on CPU)
    batch_size: int = 4  # windows of one image per backbone forward
    text_cache: Optional[str] = "auto"  # text-embedding disk cache folder; auto = the user's cache folder; null = off


@dataclass
class SegmentConfig(Config):
    """``proxyclip-segment``: one image, a list of class names."""

    image: Optional[str] = None  # None = the bundled sample image
    classes: List[str] = field(default_factory=list)
    logger: LoggerConfig = field(default_factory=LoggerConfig)



@dataclass
class EvalConfig(Config):
    """``proxyclip-eval``: one dataset, the method's hyperparameters, one confusion matrix."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    data_root: str = "data"  # the folder holding the usual dataset folders (VOCdevkit, ade, ...)
    limit: Optional[int] = None  # evaluate a reproducible random subset of this many images
    limit_seed: int = 0  # which subset
    cache_dir: Optional[str] = None  # on-disk feature cache of encode outputs; null = none
    checkpoint_seconds: float = 10.0  # save the resumable state at most this often (0 = after every image)
    log_images: int = 4  # first N images logged as segmentation masks (when a logger is on)
    progress: bool = True  # tqdm progress bar (images/s, ETA)
    run_dir: Optional[str] = None  # null = Hydra's run directory
    experiment_name: Optional[str] = None  # set by a conf/experiment preset; recorded in metrics.json
    resume: bool = True  # continue a run directory's saved state (false: discard it and start fresh)
    # processes reading and decoding images/labels ahead of the models (0 = in this process;
    # null = min(4, cores - 1), 0 on one core)
    num_workers: Optional[int] = None


@dataclass
class SweepConfig(EvalConfig):
    """``proxyclip-sweep``: the whole grid from one encode per image.

    ``sweep``: ``{knob: [values]}`` for any knob of the configured method (its switches too),
    ``logit_scale``, ``prob_thd`` and the post-process's settings (``sweep.postprocess.steps``);
    an empty list means the configured value.
    """

    sweep: Any = MISSING  # a SweepGrid generated from every registered knob (register_schemas)


_KIND_TYPES = {"float": float, "int": int, "bool": bool, "choice": str, "ints": List[int]}


def _knob_schema(base: type, name: str, knobs) -> type:
    """A dataclass schema ``base`` + one MISSING field per declared knob (values: the YAML)."""
    cols = [(k.name, _KIND_TYPES[k.kind], field(default=MISSING)) for k in knobs]
    return make_dataclass(f"{name.title().replace('_', '')}{base.__name__}", cols, bases=(base,))


def sweep_grid_schema() -> type:
    """``SweepGrid``: a list field (default empty) for every knob any registered method or
    post-process declares, plus the switches and the decision's, and ``postprocess`` with every
    post-process setting; which of them a run may sweep is checked against its method."""
    from .knobs import DECISION, SWITCHES
    from .methods import METHODS
    from .postprocess import POSTPROCESSES

    def lists(names) -> list:
        return [(n, List[Any], field(default_factory=list)) for n in dict.fromkeys(names)]

    post = make_dataclass("PostprocessSweepGrid", lists(k.name for p in POSTPROCESSES.values() for k in p.knobs))
    names = [k.name for k in SWITCHES] + [k.name for m in METHODS.values() for k in m.knobs] + [k.name for k in DECISION]
    return make_dataclass("SweepGrid", lists(names) + [("postprocess", post, field(default_factory=post))])


def register_schemas() -> None:
    """The fixed schemas, plus one per registered method (``method/<name>_schema``) and
    post-process (``postprocess/<name>_schema``) generated from their knob declarations, and the
    sweep grid's (:func:`sweep_grid_schema`)."""
    from .methods import METHODS
    from .postprocess import POSTPROCESSES

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(name="segment_schema", node=SegmentConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    grid = sweep_grid_schema()
    cs.store(name="sweep_schema", node=make_dataclass("SweepConfig", [("sweep", grid, field(default_factory=grid))],
                                                      bases=(SweepConfig,)))
    cs.store(group="clip", name="clip_schema", node=ClipConfig)
    cs.store(group="vfm", name="vfm_schema", node=VfmConfig)
    cs.store(group="weights", name="weights_schema", node=WeightsConfig)
    cs.store(group="protocol", name="protocol_schema", node=ProtocolConfig)
    for m in METHODS.values():
        cs.store(group="method", name=f"{m.name}_schema", node=_knob_schema(MethodConfig, m.name, m.knobs))
    for p in POSTPROCESSES.values():
        cs.store(group="postprocess", name=f"{p.name}_schema", node=_knob_schema(PostprocessConfig, p.name, p.knobs))
    cs.store(group="masks", name="masks_schema", node=MasksConfig)
    cs.store(group="dataset", name="dataset_schema", node=DatasetConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)


register_schemas()


def compose_config(config_name: str = "config", overrides: Optional[List[str]] = None) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` (config, segment, eval, sweep) without running a Hydra app.

    >>> cfg = compose_config(overrides=["clip=vit_b16", "vfm=dino_vitb8", "weights=random"])
    >>> cfg = compose_config("eval", ["dataset=voc21", "data_root=/datasets", "limit=50"])
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not CONF_DIR.is_dir():
        raise FileNotFoundError(
            f"config folder {CONF_DIR} not found: install the package in editable mode "
            "(pip install -e .) from a checkout, or set PROXYCLIP_CONF_DIR"
        )
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name, overrides=list(overrides or []))
    _COMPOSED[id(cfg)] = (weakref.ref(cfg), [o.split("=", 1)[0].lstrip("+~") for o in overrides or []])
    protocol_resolvers.apply_method_knobs(cfg)  # the preset's per-dataset method knobs; overrides win
    return cfg


def with_method_knobs(task: Any) -> Any:
    """``task`` (a Hydra app's function of its cfg) with the protocol preset's per-dataset method
    knobs written into ``cfg.method`` first (:func:`proxyclip.protocol_resolvers.apply_method_knobs`;
    the command line's ``method.<knob>=`` wins)."""

    @functools.wraps(task)
    def run(cfg: Any) -> Any:
        protocol_resolvers.apply_method_knobs(cfg)
        return task(cfg)

    return run


_COMPOSED: Dict[int, Any] = {}  # id(cfg) -> (weak reference, override keys) of compose_config's results


def chosen_overrides(cfg: Any) -> List[str]:
    """The keys the user set for ``cfg``: the command line's (``vfm``, ``method.gamma``, ...) in a
    Hydra app, else ``compose_config``'s overrides; a preset's or the default's choices are not in it."""
    entry = _COMPOSED.get(id(cfg))
    if entry is not None and entry[0]() is cfg:
        return list(entry[1])
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]
    except Exception:
        pass
    return []


@functools.lru_cache(maxsize=None)
def group_choice(group: str, name: str) -> DictConfig:
    """The composed node of one config-group choice, e.g. ``group_choice("method", "sclip")``: its
    YAML's values over its schema (read-only; cached). Used to decode with another method or
    post-process than the configured one, with that one's own defaults."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"{group}={name}"]
    gh = GlobalHydra.instance()  # a Hydra app of ours (conf/'s config on its search path), not another
    # package's: importing sam2 initializes the global Hydra with sam2's own configs
    ours = gh.is_initialized() and any(src.provider == "main" and src.is_config("config")
                                       for src in gh.config_loader().get_sources())
    cfg = compose("config", overrides=overrides) if ours else compose_config(overrides=overrides)
    node = cfg[group]
    OmegaConf.set_readonly(node, True)
    return node
