"""A prompt's corrupted embeddings: embed, select the tokens in scope, key the noise, corrupt.

The one place the proxy (a flagged prompt) and the trainer (a probe, at a candidate strength) make them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from corruption.embeddings import EmbeddingTable
from corruption.functions import corrupt
from corruption.keys import keyed_generator
from corruption.scope import entity_mask
from corruption.spec import CorruptionSpec


def scope_mask(spec: CorruptionSpec, offsets: Sequence[tuple[int, int]], text: str,
               entities: Sequence[str]) -> torch.Tensor:
    """The tokens the corruption touches: the entity terms' tokens (scope `entities`), else all."""
    if spec.scope == "entities":
        return entity_mask(offsets, text, list(entities)).mask
    return torch.ones(len(offsets), dtype=torch.bool)


def corrupted_embeddings(embeddings: EmbeddingTable, token_ids: Sequence[int], spec: CorruptionSpec,
                         mask: torch.Tensor, secret_key: bytes, label: str) -> torch.Tensor:
    """The prompt's exact input embeddings with `spec`'s noise on the masked tokens, keyed by
    (secret key, token ids, label): the same prompt always gets the same noise."""
    generator = keyed_generator(secret_key, token_ids, label)
    return corrupt(embeddings.embed(token_ids), spec, mask, generator)
