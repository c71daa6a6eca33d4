"""The wire format vLLM accepts for `prompt_embeds`: base64 of `torch.save(tensor)`."""
from __future__ import annotations

import base64
import io

import torch


def encode_prompt_embeds(embeds: torch.Tensor) -> str:
    if embeds.ndim != 2:
        raise ValueError(f"prompt embeddings must be [tokens, hidden], got shape {tuple(embeds.shape)}")
    buffer = io.BytesIO()
    torch.save(embeds.contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
