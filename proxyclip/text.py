"""Text side: class lines with synonyms, 80-template prompt ensembles, cached embeddings.

Embeddings are cached in memory per name and, by default, on disk (one file per name in the
user's cache folder), keyed by the CLIP model's identity, the template set and the name, so a
second run of a large class list (ADE-847) costs no text encoding.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import open_clip
import torch
import torch.nn.functional as F

from .files import atomic_write

TEMPLATES = open_clip.OPENAI_IMAGENET_TEMPLATES  # OpenAI's 80 ImageNet prompt templates
# Synonyms are separated by "; " (a ";" followed by white space or the end of the line), as in the
# published protocol: commas never split, so "building, edifice" is one name (one query).
SYNONYM_SEPARATOR = re.compile(r";(?=\s|$)")
BACKGROUND = "background"  # the display name of class 0 when its line is a list of background words


@dataclass(frozen=True)
class ClassList:
    """K class lines expanded into Q query names.

    ``query_to_class[q]`` is the class index of query ``q``; a class's probability is the
    max over its queries.
    """

    class_names: List[str]  # the K lines as given, stripped
    queries: List[str]  # the Q names
    query_to_class: List[int]


def parse_classes(classes: Sequence[str] | str) -> ClassList:
    """Split class lines such as ``"person; people"`` into queries; reject empty or duplicate input.

    The one exception: a word of class 0's background word list may also be a later class
    (COCO-Object's published file has "bed" in both); each keeps it as a query, as the
    published code does, and a tie goes to class 0 (the argmax takes the first).
    """
    if isinstance(classes, str):
        raise TypeError(f"classes must be a list of class lines, not one string ({classes!r}); "
                        "wrap it in a list, e.g. ['sky', 'person; people']")
    lines = [str(c) for c in classes]
    if not lines:
        raise ValueError("the class list is empty: give at least one class name")
    class_names, queries, owner = [], [], []
    seen: Dict[str, int] = {}
    for k, line in enumerate(lines):
        names = [n.strip() for n in SYNONYM_SEPARATOR.split(line)]
        names = [n for n in names if n]
        if not names:
            raise ValueError(f"class {k} ({line!r}) holds no name: only separators or white space")
        for name in names:
            key = name.lower()
            # a background word list (class 0 with several names, as the published VOC21 / COCO-Object
            # files have) may share a word with a later class: both keep it, a tie goes to class 0
            shared_background_word = seen.get(key) == 0 and k > 0 and len(SYNONYM_SEPARATOR.split(lines[0])) > 1
            if key in seen and not shared_background_word:
                where = "twice in that class" if seen[key] == k else f"also in class {seen[key]} ({lines[seen[key]]!r})"
                raise ValueError(f"duplicate class name {name!r} in class {k} ({line!r}): {where}")
            seen[key] = k
            queries.append(name)
            owner.append(k)
        class_names.append(line.strip())
    return ClassList(class_names, queries, owner)


def display_name(line: str) -> str:
    """The short name of a class line: its first synonym ("person; people" -> "person")."""
    return SYNONYM_SEPARATOR.split(str(line))[0].strip()


def display_names(class_lines: Sequence[str], background_class: bool = False) -> List[str]:
    """One short name per class line (for metrics, CSVs, W&B keys, legends and tables).

    ``background_class``: class 0's line is a list of background words (VOC21, Context60,
    COCO-Object): it is shown as ``"background"``, not as its first word.
    """
    names = [display_name(line) for line in class_lines]
    if background_class and names:
        names[0] = BACKGROUND
    return names


class TextEncoder:
    """Prompt-ensembled CLIP text embeddings, cached per name for one CLIP model.

    For each name: encode all templates, L2-normalize each, average, L2-normalize again.

    ``cache_dir``: a folder for the on-disk cache (None = memory only); ``model_id``: a string
    that identifies the CLIP model's weights (see :func:`text_cache_options`).
    """

    def __init__(self, clip_model: torch.nn.Module, tokenizer, device: torch.device, batch_size: int = 320,
                 cache_dir: Optional[os.PathLike] = None, model_id: str = ""):
        self.model = clip_model
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self._cache: Dict[str, torch.Tensor] = {}
        self.disk = TextDiskCache(cache_dir, model_id) if cache_dir is not None else None

    def _can_trim(self) -> bool:
        m = self.model
        return (isinstance(m, open_clip.CLIP) and getattr(m, "text_pool_type", None) == "argmax"
                and getattr(m, "attn_mask", None) is not None)

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``model.encode_text``, but only over the positions up to the last end-of-text token.

        The text tower is causal and pools at the end-of-text token (the highest token id), so
        the padding positions after it cannot change the result; skipping them makes the
        80-template ensembles about 4x faster. Other text towers use ``encode_text`` as is.
        """
        m = self.model
        if not self._can_trim():
            return m.encode_text(tokens)
        length = int(tokens.argmax(dim=-1).max()) + 1
        tokens = tokens[:, :length]
        dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(dtype) + m.positional_embedding[:length].to(dtype)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:length, :length]))
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection

    @torch.no_grad()
    def _encode_prompts(self, prompts: List[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(prompts[i:i + self.batch_size]).to(self.device)
            out.append(F.normalize(self._encode_text(tokens).float(), dim=-1))
        return torch.cat(out)

    def embed(self, names: Sequence[str]) -> torch.Tensor:
        """(Q, E) float32 embeddings of ``names``; names seen before come from the cache (memory, then disk)."""
        missing = [n for n in dict.fromkeys(names) if n not in self._cache]
        if self.disk is not None:
            for name in list(missing):
                emb = self.disk.get(name)
                if emb is not None:
                    self._cache[name] = emb.to(self.device)
                    missing.remove(name)
        if missing:
            prompts = [t(n) for n in missing for t in TEMPLATES]
            per_prompt = self._encode_prompts(prompts).view(len(missing), len(TEMPLATES), -1)
            for name, emb in zip(missing, F.normalize(per_prompt.mean(dim=1), dim=-1)):
                self._cache[name] = emb
                if self.disk is not None:
                    self.disk.put(name, emb)
        return torch.stack([self._cache[n] for n in names])


TEMPLATES_DIGEST = hashlib.sha256("\n".join(t("{}") for t in TEMPLATES).encode()).hexdigest()[:16]


class TextDiskCache:
    """One file per name: ``<folder>/<sha256(model_id, templates, name)>.pt``, written atomically
    (concurrent processes, e.g. torchrun ranks, never leave a half-written entry). An unreadable
    or inconsistent entry is reported in one line and recomputed."""

    def __init__(self, folder: os.PathLike, model_id: str):
        self.folder = Path(folder)
        self.model_id = model_id
        self.hits = self.misses = 0
        self.broken = False  # a write failed: said once, then memory only

    def path(self, name: str) -> Path:
        key = hashlib.sha256(f"{self.model_id}\0{TEMPLATES_DIGEST}\0{name}".encode()).hexdigest()
        return self.folder / f"{key}.pt"

    def get(self, name: str) -> Optional[torch.Tensor]:
        p = self.path(name)
        if not p.is_file():
            self.misses += 1
            return None
        try:
            d = torch.load(p, map_location="cpu", weights_only=True)
            emb = d["embedding"]
            if d["name"] != name or d["model_id"] != self.model_id or emb.ndim != 1 or not torch.isfinite(emb).all():
                raise ValueError("entry does not match its key")
        except Exception as e:  # truncated, corrupt, or foreign file
            reason = (str(e).strip().splitlines() or [""])[0][:120]
            print(f"[proxyclip] text cache: {p} is unreadable ({type(e).__name__}: {reason}); recomputing {name!r}")
            self.misses += 1
            return None
        self.hits += 1
        return emb.float()

    def put(self, name: str, emb: torch.Tensor) -> None:
        if self.broken:
            return
        entry = {"name": name, "model_id": self.model_id, "embedding": emb.detach().float().cpu().clone()}
        try:
            atomic_write(self.path(name), lambda f: torch.save(entry, f))
        except OSError as e:  # a read-only or full disk must not stop a run: say so once
            self.broken = True
            print(f"[proxyclip] text cache: cannot write the folder {self.folder} (text_cache; "
                  f"{type(e).__name__}: {e.strerror or e}); text embeddings are kept in memory only")


def default_text_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/proxyclip/text``, else ``~/.cache/proxyclip/text``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "proxyclip" / "text"


def text_cache_options(cfg: Any, random_weights: bool, model_id: Optional[str] = None) -> Dict[str, Any]:
    """``cache_dir`` and ``model_id`` for :class:`TextEncoder` from a core config.

    ``cfg.text_cache``: ``auto`` (the user's cache folder), a folder, or null (no disk cache).
    The model identity is the encode spec's text-tower identity (``EncodeSpec.text_model_id``:
    architecture, tag, quick_gelu, checkpoint digest, weights source and seed, precision).
    """
    from .specs import EncodeSpec

    where = cfg.get("text_cache", "auto") if hasattr(cfg, "get") else getattr(cfg, "text_cache", "auto")
    if where in (None, "", "null", "none"):
        return {}
    if model_id is None:  # a Segmenter passes its own encode spec's
        model_id = EncodeSpec.from_config(cfg, random_weights=random_weights, uses_vfm=False).text_model_id()
    folder = default_text_cache_dir() if where == "auto" else Path(os.path.expanduser(str(where)))
    return {"cache_dir": folder, "model_id": model_id}
