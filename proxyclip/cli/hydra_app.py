"""Running a Hydra app so that every config-level mistake is one ``error:`` line (exit code 2).

Why compose first: Hydra composes the config before the task function runs, and reports a
composition error (unknown preset, unknown key, wrong type) through its own handler as several
lines and exit code 1; ``+key=value`` for a key no schema knows is even accepted silently. So
:func:`run_app` validates the command line itself before handing it to ``hydra.main``: it parses
the arguments with Hydra's own parser, composes the config with Hydra's compose API (the same
config search path and plugins), once per value of every swept key in a multirun, and turns any
failure into one line (:func:`errors.describe_config_error`). It also refuses group choices that
are schemas or fragments, appended keys (``+key=``) that no schema declares, and folder settings
that cannot be used (``hydra.run.dir``/``hydra.sweep.dir``, ``run_dir``, ``cache_dir``,
``text_cache``, ``logger.dir``). Only a command line that composes is run by Hydra, so Hydra's
handler is left with nothing to report but real bugs.

``--help`` is printed here too (Hydra's needs a composable config, so it fails without a
dataset, and it lists schema entries as choices): the app's docstring, its groups with their
choices, and the composed config (a required group left out is shown as not chosen).
``--cfg job`` without a required group prints the config the same way; otherwise Hydra prints it.

A multirun's failed jobs are recorded in :data:`errors.LEDGER` (jobs run in this process with
Hydra's basic launcher); after the multirun, :func:`run_app` exits 2 naming them. (With a
launcher that runs jobs elsewhere, e.g. Slurm, each failed job's folder holds its error.txt.)
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, List, Optional, Sequence

from . import errors

FOLDER_SETTINGS = ("run_dir", "cache_dir", "text_cache", "logger.dir")


def _parse_args(argv: Sequence[str]):
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(list(argv))


class Composer:
    """The compose API over this app's config folder (Hydra initialized while in use)."""

    def __init__(self, config_name: str):
        from ..config import CONF_DIR

        self.config_name = config_name
        self._dir = str(CONF_DIR)

    def __enter__(self) -> "Composer":
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        if GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()
        self._ctx = initialize_config_dir(version_base="1.3", config_dir=self._dir)  # initializes Hydra
        self._ctx.__enter__()
        self.loader = GlobalHydra.instance().config_loader()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)

    def compose(self, overrides: Sequence[str], hydra_node: bool = True) -> Any:
        from hydra import compose

        return compose(self.config_name, overrides=list(overrides), return_hydra_config=hydra_node)

    def groups(self) -> List[str]:
        """The app's config groups (Hydra's own, ``hydra/...``, are in ``--hydra-help``)."""
        return [g for g in self.loader.list_groups("") if g != "hydra"]

    def options(self, group: str) -> List[str]:
        return [o for o in self.loader.get_group_options(group) if not errors.is_hidden_choice(o)]

    def is_group(self, name: str) -> bool:
        return bool(name) and name.split("/")[0] in self.groups()

    def required_groups(self) -> List[str]:
        """Groups the primary config's defaults list leaves as ``???``."""
        from omegaconf import OmegaConf

        from ..config import CONF_DIR

        defaults = OmegaConf.load(CONF_DIR / f"{self.config_name}.yaml").get("defaults", [])
        return [k for d in defaults if OmegaConf.is_dict(d) for k in d if OmegaConf.is_missing(d, k)]

    def describe(self, exc: BaseException, overrides: Sequence[str]) -> str:
        def without(key: str) -> Any:
            return self.compose([o for o in overrides if _key(o) != key], hydra_node=False)

        return errors.describe_config_error(exc, without, self.groups(), self.options)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _variants(overrides: Sequence[str], multirun: bool) -> List[List[str]]:
    """The override lists to compose: the command line itself, or in a multirun each swept key's
    values in turn (the other swept keys at their first value)."""
    if not multirun:
        return [list(overrides)]
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    values: List[List[str]] = []
    for o in parsed:
        if not o.is_sweep_override():
            values.append([o.input_line])
            continue
        key = o.get_key_element()
        if isinstance(o.value(), IntervalSweep):  # an Optuna range: its start stands for every value
            values.append([f"{key}={o.value().start}"])
            continue
        try:
            values.append([f"{key}={v}" for v in o.sweep_string_iterator()] or [o.input_line])
        except Exception:  # a sweep kind with no list of values (e.g. a glob): Hydra checks it
            values.append([])
    first = [v[0] for v in values if v]
    out = [first]
    for i, vs in enumerate(values):
        for v in vs[1:]:
            out.append([(v if j == i else w[0]) for j, w in enumerate(values) if w])
    return out


def _check_overrides(c: Composer, overrides: Sequence[str]) -> None:
    """Group choices that are schemas or fragments, and appended keys no schema declares."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        if key.startswith("hydra"):
            continue
        if c.is_group(key):
            choice = o.value() if isinstance(o.value(), str) else None
            if choice is not None and errors.is_hidden_choice(choice):
                raise errors.UsageError(f"{key}={choice}: not a choice (a schema or shared fragment); "
                                        + errors.choices_text(c.options(key)))
            continue
        if o.is_add() or o.is_force_add():
            _check_appended(c, key, o.input_line, overrides)


def _check_appended(c: Composer, key: str, line: str, overrides: Sequence[str]) -> None:
    """``+key=value`` adds a key: allowed only inside a free mapping (``vfm.timm_kwargs``)."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    cfg = c.compose([o for o in overrides if o != line], hydra_node=False)
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if isinstance(parent, DictConfig):
        kind = OmegaConf.get_type(parent)
        fields = [f.name for f in dataclasses.fields(kind)] if dataclasses.is_dataclass(kind) else None
        if fields is None or leaf in fields:
            return  # a free mapping, or the key exists (Hydra says so if "+" was wrong)
        raise errors.UsageError(f"{line}: no such key in {parent_key or 'the config'} (a '+' cannot add keys the "
                                f"schema does not declare); {errors.choices_text(fields, leaf)}")
    raise errors.UsageError(f"{line}: {parent_key or key} is not a group of settings here")


def _check_folders(cfg: Any, multirun: bool) -> None:
    from omegaconf import OmegaConf

    settings = list(FOLDER_SETTINGS) + (["hydra.sweep.dir"] if multirun else ["hydra.run.dir"])
    for setting in settings:
        try:
            value = OmegaConf.select(cfg, setting)
        except Exception:
            continue
        if value in (None, "", "auto") or (setting == "text_cache" and value is None):
            continue
        reason = errors.check_folder(value, setting)
        if reason:
            raise errors.UsageError(reason)


def _preset_sweeps(c: Composer, overrides: Sequence[str]) -> List[str]:
    """A preset's ``hydra.sweeper.params`` (``dataset: voc21,ade20k``) the command line does not
    set, as overrides: the sweeper adds them to every job, so a required group may come from them."""
    from omegaconf import OmegaConf

    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = {_key(o) for o in overrides}
    stand_ins = [f"~{g}" for g in c.required_groups() if g not in given]
    try:  # the presets and Hydra's own choices decide the sweeper's params: compose just those
        chosen = [o.input_line for o in OverridesParser.create().parse_overrides(list(overrides))
                  if not o.is_sweep_override() and (c.is_group(o.key_or_group) or o.key_or_group.startswith("hydra"))]
        cfg = c.compose(chosen + stand_ins + ["hydra.run.dir=.", "hydra.sweep.subdir=."])
        params = OmegaConf.to_container(OmegaConf.select(cfg, "hydra.sweeper.params") or {})
    except Exception:  # the command line itself does not compose: validate() reports it
        return []
    return [f"{k}={v}" for k, v in params.items() if k not in given]


def validate(config_name: str, overrides: Sequence[str], multirun: bool) -> Optional[str]:
    """Compose the command line as Hydra will (each swept value in a multirun); return the one-line
    error, or None when it composes. A required group left out is reported too."""
    with Composer(config_name) as c:
        try:
            _check_overrides(c, overrides)
            if multirun:
                overrides = list(overrides) + _preset_sweeps(c, overrides)
            for variant in _variants(overrides, multirun):
                try:
                    cfg = c.compose(variant)
                except Exception as e:
                    return c.describe(e, variant)
                try:  # the protocol preset's method knobs (a bad table: one line naming its file)
                    from ..protocol_resolvers import apply_method_knobs

                    apply_method_knobs(cfg, [_key(o) for o in variant])
                except ValueError as e:
                    return str(e)
                _check_folders(cfg, multirun)
        except errors.UsageError as e:
            return str(e)
        except Exception as e:
            return c.describe(e, overrides)
    return None


def print_help(prog: str, doc: str, config_name: str, overrides: Sequence[str], cfg_only: bool = False,
               resolve: bool = False) -> None:
    """The app's docstring, groups with their choices, and the composed config (``--help``);
    ``cfg_only``: the config alone (``--cfg job`` without a required group)."""
    from omegaconf import OmegaConf

    with Composer(config_name) as c:
        required = [g for g in c.required_groups() if not any(_key(o) == g for o in overrides)]
        cfg = c.compose(list(overrides) + [f"~{g}" for g in required], hydra_node=False)
        lines: List[str] = []
        if not cfg_only:
            lines += [doc.strip(), "", "Config groups (group=choice):"]
            for g in c.groups():
                tag = " (required)" if g in required else ""
                lines.append(f"  {g}{tag}: {', '.join(c.options(g))}")
            lines += ["", "Any setting below: key=value (method.beta=1.4, protocol.crop=224); lists in brackets.",
                      "Flags: -m (a multirun over comma-separated values), --cfg job (print the config),",
                      "--resolve, --hydra-help (Hydra's own options).", "", "Config:"]
        for g in required:
            lines.append(f"# {g}: not chosen ({g}=NAME: {', '.join(c.options(g))})")
            OmegaConf.set_struct(cfg, False)
            cfg[g] = "???"
        if resolve:  # interpolations replaced; a value left to choose stays ???
            cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
        text = OmegaConf.to_yaml(cfg)
        print("\n".join(lines) + ("\n" if lines else "") + text, end="")


def run_app(prog: str, config_name: str, task: Callable[[Any], Any], doc: str,
            argv: Optional[Sequence[str]] = None) -> None:
    """``hydra.main`` for ``task`` with help, validation and multirun failures (module docstring)."""
    import hydra

    from ..config import CONF_DIR, with_method_knobs

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    if args.help:
        try:
            print_help(prog, doc, config_name, args.overrides, resolve=args.resolve)
        except Exception as e:  # an override that does not compose
            with Composer(config_name) as c:
                errors.fail(prog, c.describe(e, args.overrides))
        sys.exit(0)
    if not (args.hydra_help or args.shell_completion or args.info):
        if args.cfg == "job":
            with Composer(config_name) as c:
                missing = [f"{g}={c.options(g)[0]}" for g in c.required_groups()
                           if not any(_key(o) == g for o in args.overrides)]
            if missing:  # check the rest with a stand-in choice, print the config without one
                message = validate(config_name, list(args.overrides) + missing, False)
                if message:
                    errors.fail(prog, message)
                print_help(prog, doc, config_name, args.overrides, cfg_only=True, resolve=args.resolve)
                sys.exit(0)
        message = validate(config_name, args.overrides, args.multirun)
        if message:
            errors.fail(prog, message)
    sys.argv = [sys.argv[0], *argv]
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(with_method_knobs(task))()
    summary = errors.LEDGER.summary()
    if summary:
        errors.fail(prog, summary)


def job_label() -> str:
    """This Hydra job's number and overrides (``#1 dataset=context60``), for the multirun summary."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        return f"#{hc.job.num} {' '.join(hc.overrides.task)}".strip()
    except Exception:
        return "job"


def in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def report_job_error(prog: str, message: str, out_dir: Any = None) -> None:
    """A task's input error: one ``error:`` line (and ``error.txt`` in the job's folder); a single
    run exits 2, a multirun job is recorded in the ledger and the other jobs still run."""
    line = f"{prog}: error: {errors.one_line(message)}"
    print(line, file=sys.stderr)
    if out_dir is not None:
        try:
            from pathlib import Path

            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "error.txt").write_text(line + "\n")
        except OSError:
            pass
    if not in_multirun():
        sys.exit(errors.USAGE)
    errors.LEDGER.record(False, job_label(), f"{out_dir}/error.txt" if out_dir is not None else "")


def report_job_done() -> None:
    if in_multirun():
        errors.LEDGER.record(True)


def quiet_root_info() -> None:
    """open_clip logs its chatter (``Parsing tokenizer ...``) at INFO on the root logger: raise the
    root logger to WARNING (warnings still show) and keep proxyclip's own INFO lines."""
    import logging

    root = logging.getLogger()
    own = logging.getLogger("proxyclip")
    if own.level == logging.NOTSET:
        own.setLevel(min(root.level or logging.INFO, logging.INFO))
    if root.level < logging.WARNING:
        root.setLevel(logging.WARNING)


def user_overrides() -> List[str]:
    """The keys (and groups) this Hydra job's command line sets, e.g. ``["vfm", "method.gamma"]``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return [_key(o) for o in HydraConfig.get().overrides.task]
    except Exception:
        return []
