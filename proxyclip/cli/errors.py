"""One ``PROG: error: ...`` line for every mistake a user can make on the command line (exit code 2).

:func:`fail` prints the line and exits; :data:`INPUT_ERRORS` are the exception types a task reports
that way (bad data, bad values, missing files: never a stack trace). :func:`describe_config_error`
turns Hydra's multi-line composition errors (unknown preset, unknown key, wrong type, a list
without brackets, a group the app does not have) into one line naming the key, what was expected
and the valid choices. :func:`check_folder` says why a folder setting cannot be used.
:class:`JobLedger` remembers the failed jobs of a multirun (run in this process by Hydra's basic
launcher), so the app can exit non-zero at the end naming them.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, NoReturn, Optional, Sequence

from ..backbones import WeightsUnavailable
from ..images import ImageError

USAGE = 2  # the exit code of every input / config mistake


class UsageError(ValueError):
    """A config-level mistake, already worded as the one line the user sees."""


def _input_errors() -> tuple:
    from ..data import BadLabelError, DatasetNotFoundError

    return (UsageError, ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError,
            FileExistsError, ImageError, WeightsUnavailable, DatasetNotFoundError, BadLabelError, RuntimeError)


def input_errors() -> tuple:
    """The exception types a task reports as one ``error:`` line (data, values, files, weights)."""
    return _input_errors()


def one_line(text: Any) -> str:
    """``text`` on one line: its non-empty lines joined with ``; ``."""
    return "; ".join(ln.strip() for ln in str(text).splitlines() if ln.strip())


def say_error(prog: str, message: Any) -> int:
    """Print the one ``PROG: error: ...`` line; return the usage exit code (for ``main() -> int``)."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return USAGE


def fail(prog: str, message: Any, code: int = USAGE) -> NoReturn:
    say_error(prog, message)
    sys.exit(code)


def is_hidden_choice(name: str) -> bool:
    """Schema entries (``*_schema``, generated per method/post-process) and ``_``-prefixed fragments
    live beside the presets of a config group but are not choices a user can pick."""
    leaf = name.rsplit("/", 1)[-1]
    return leaf.endswith("_schema") or leaf.startswith("_")


def choices_text(options: Sequence[str], wanted: Optional[str] = None) -> str:
    """``one of a, b, c`` (hidden entries dropped), with ``did you mean x?`` for a near miss."""
    shown = [o for o in options if not is_hidden_choice(o)]
    near = difflib.get_close_matches(wanted, shown, n=1) if wanted else []
    return ("did you mean " + near[0] + "? " if near else "") + "valid: " + ", ".join(shown)


def expected_text(node: Any, key: str) -> str:
    """What ``key`` takes, in words: a knob's declaration when it is one, else the schema's type."""
    from omegaconf import ListConfig
    from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode, StringNode

    parent, _, leaf = key.rpartition(".")
    if parent in ("method", "postprocess"):
        from ..knobs import DECISION, SWITCHES
        from ..methods import METHODS
        from ..postprocess import POSTPROCESSES

        registry = METHODS if parent == "method" else POSTPROCESSES
        for entry in registry.values():
            for knob in tuple(SWITCHES) + tuple(entry.knobs) + tuple(DECISION):
                if knob.name == leaf:
                    return knob.expected()
    kinds = {BooleanNode: "true or false", IntegerNode: "an integer", FloatNode: "a number", StringNode: "a string"}
    if node is None:
        return "a value of the schema's type"
    if isinstance(node, ListConfig):
        return f"a list in brackets, e.g. '{key}=[a,b]'"
    for kind, words in kinds.items():
        if isinstance(node, kind):
            return words
    return "a value of the schema's type"


def _cause_key(exc: BaseException) -> Optional[str]:
    cause = exc.__cause__
    key = getattr(cause, "full_key", None)
    return str(key) if key else None


def describe_config_error(exc: BaseException, compose_without: Callable[[str], Any], groups: Sequence[str],
                          group_options: Callable[[str], List[str]]) -> str:
    """One line for a Hydra composition error.

    ``compose_without(key)`` composes the same config without the overrides of ``key`` (to list
    the keys that do exist and the type the schema wants); ``groups`` are the app's config groups
    and ``group_options(group)`` a group's entries.
    """
    from hydra.errors import MissingConfigException
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    text = str(exc)
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and "/" in exc.missing_cfg_file:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        return f"{group}={name}: no such {group} preset; {choices_text(list(exc.options or group_options(group)), name)}"
    if text.startswith("You must specify '"):
        group = text.split("'")[1]
        return f"{group}: required, e.g. {group}=NAME; {choices_text(group_options(group))}"
    if "No match in the defaults list" in text and text.startswith("Could not override '"):
        group = text.split("'")[1]
        return f"{group}: this command has no {group} group; its groups: {', '.join(groups)}"
    key = _cause_key(exc)
    if key and isinstance(exc.__cause__, (ConfigAttributeError, ConfigKeyError)):
        parent, _, leaf = key.rpartition(".")
        try:
            node = OmegaConf.select(compose_without(key), parent) if parent else compose_without(key)
        except Exception:
            node = None
        known = [k for k in node.keys()] if isinstance(node, DictConfig) else []
        where = parent or "the config"
        if known and OmegaConf.get_type(node) is dict:
            return f"{key}: no such key in {where} (a free mapping: set it with {key.rpartition('.')[0]}={{...}})"
        return f"{key}: no such key in {where}; " + (choices_text(known, leaf) if known else "")
    if key and isinstance(exc.__cause__, ValidationError):
        value = text.split("=", 1)[1] if text.startswith("Error merging override ") else "?"
        try:
            cfg = compose_without(key)
            node = cfg._get_node(key) if "." not in key else OmegaConf.select(cfg, key.rpartition(".")[0])._get_node(
                key.rpartition(".")[2])
        except Exception:
            node = None
        return f"{key}={value}: expected {expected_text(node, key)}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("\t")]
    cause = exc.__cause__
    if cause is not None:
        lines.append(str(cause).splitlines()[0])
    return "; ".join(lines[:3])


def check_folder(path: Any, setting: str) -> Optional[str]:
    """Why the folder ``path`` (setting ``setting``) cannot be used or created, or None if it can."""
    p = Path(os.path.expanduser(str(path)))
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == p else f"cannot be created: {probe} is a file"
        return f"{setting}={path}: {what}, not a folder; choose another folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{setting}={path}: {probe} is not writable; choose another folder"
    return None


@dataclass
class JobLedger:
    """The jobs of this process's multirun that failed: (job label, message)."""

    failed: List[tuple] = field(default_factory=list)
    done: int = 0

    def record(self, ok: bool, label: str = "", message: str = "") -> None:
        self.done += 1
        if not ok:
            self.failed.append((label, message))

    def summary(self) -> Optional[str]:
        if not self.failed:
            return None
        names = "; ".join(f"{label} ({where})" if where else label for label, where in self.failed)
        return f"{len(self.failed)} of {self.done} jobs failed: {names}"


LEDGER = JobLedger()
