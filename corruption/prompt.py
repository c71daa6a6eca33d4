"""A prompt's corrupted embeddings: embed, select the tokens in scope, key the noise, corrupt.

The one place the proxy (a flagged prompt) and the trainer (a probe, at a candidate strength) make them.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from corruption.embeddings import EmbeddingTable
from corruption.functions import corrupt
from corruption.keys import keyed_generator
from corruption.scope import entity_mask
from corruption.spec import CorruptionSpec


@dataclass(frozen=True)
class TokenMasks:
    """Which tokens the corruption touches: `primary` at the spec's strength (the entity terms' tokens under
    scope `entities`, else every token), `other` at its `other_sigma` (the remaining tokens, scope `entities`).
    Special tokens are in neither unless the spec corrupts them."""

    primary: torch.Tensor  # bool [tokens]
    other: torch.Tensor  # bool [tokens]


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """The tokenizer's special and added tokens: BOS, EOS, padding and the chat template's turn markers."""
    return frozenset(tokenizer.all_special_ids) | frozenset(tokenizer.added_tokens_decoder)


def token_masks(spec: CorruptionSpec, token_ids: Sequence[int], offsets: Sequence[tuple[int, int]], text: str,
                entities: Sequence[str], special_ids: Collection[int]) -> TokenMasks:
    corruptible = torch.tensor([spec.corrupt_special_tokens or token not in special_ids for token in token_ids],
                               dtype=torch.bool)
    if spec.scope == "all":
        return TokenMasks(corruptible, torch.zeros_like(corruptible))
    entity = entity_mask(offsets, text, list(entities)).mask  # every token when no term occurs
    return TokenMasks(entity & corruptible, ~entity & corruptible)


def corrupted_embeddings(embeddings: EmbeddingTable, token_ids: Sequence[int], spec: CorruptionSpec,
                         masks: TokenMasks, secret_key: bytes, label: str) -> torch.Tensor:
    """The prompt's exact input embeddings with `spec`'s noise on the masked tokens, keyed by
    (secret key, token ids, label): the same prompt always gets the same noise. The primary tokens draw
    first, so their noise does not depend on `other_sigma`."""
    generator = keyed_generator(secret_key, token_ids, label)
    embeds = corrupt(embeddings.embed(token_ids), spec, masks.primary, generator)
    if spec.other_sigma:
        embeds = corrupt(embeds, spec.for_other_tokens(), masks.other, generator)
    return embeds
