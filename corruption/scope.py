"""Entity scope: which tokens of a prompt belong to the target's key terms.

Terms are matched case-insensitively on word boundaries in the prompt text, and a token is
selected when its character span overlaps a match. With no match the whole prompt is
selected: a flagged prompt is never sent on uncorrupted.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EntityMatch:
    mask: torch.Tensor  # bool [tokens]
    matched: tuple[str, ...]  # the terms found, in the order given

    @property
    def fell_back(self) -> bool:
        return not self.matched


def entity_mask(offsets: Sequence[tuple[int, int]], text: str, terms: Sequence[str]) -> EntityMatch:
    spans, matched = [], []
    for term in terms:
        found = [m.span() for m in re.finditer(rf"(?<!\w){re.escape(term)}(?!\w)", text, re.IGNORECASE)]
        if found:
            matched.append(term)
            spans.extend(found)
    if not spans:
        return EntityMatch(torch.ones(len(offsets), dtype=torch.bool), ())
    mask = torch.tensor([any(start < end_m and start_m < end for start_m, end_m in spans)
                         for start, end in offsets], dtype=torch.bool)
    return EntityMatch(mask, tuple(matched))
