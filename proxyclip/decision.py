"""The class decision: merged score maps -> class probabilities -> labels."""

from __future__ import annotations

from typing import List, Tuple

import torch

from .text import ClassList


def decide(scores: torch.Tensor, classes: ClassList, logit_scale: float, prob_thd: float
           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Q, H, W) scores -> (K, H, W) class probabilities and (H, W) int64 labels.

    probs = max over each class's queries of softmax(logit_scale * scores) over all queries;
    labels = argmax over classes (the first on a tie); best probability < prob_thd -> class 0.
    """
    q_probs = torch.softmax(logit_scale * scores, dim=0)
    k = len(classes.class_names)
    if k == len(classes.queries):  # one name per class: queries are the classes, in order
        probs = q_probs
    else:
        groups: List[List[int]] = [[] for _ in range(k)]
        for q, owner in enumerate(classes.query_to_class):
            groups[owner].append(q)
        probs = torch.stack([q_probs[g[0]] if len(g) == 1 else q_probs[g].amax(dim=0) for g in groups])
    best, labels = probs.max(dim=0)
    if prob_thd > 0:
        labels[best < prob_thd] = 0
    return probs, labels.long()
