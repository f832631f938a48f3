"""Text side: class lines with synonyms, 80-template prompt ensembles, cached embeddings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Sequence

import open_clip
import torch
import torch.nn.functional as F

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
    """Split class lines such as ``"person; people"`` into queries; reject empty or duplicate input."""
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
            if key in seen:
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
    """

    def __init__(self, clip_model: torch.nn.Module, tokenizer, device: torch.device, batch_size: int = 320):
        self.model = clip_model
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self._cache: Dict[str, torch.Tensor] = {}

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
        """(Q, E) float32 embeddings of ``names``; names seen before come from the cache."""
        missing = [n for n in dict.fromkeys(names) if n not in self._cache]
        if missing:
            prompts = [t(n) for n in missing for t in TEMPLATES]
            per_prompt = self._encode_prompts(prompts).view(len(missing), len(TEMPLATES), -1)
            for name, emb in zip(missing, F.normalize(per_prompt.mean(dim=1), dim=-1)):
                self._cache[name] = emb
        return torch.stack([self._cache[n] for n in names])
