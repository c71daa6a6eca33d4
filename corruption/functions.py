"""The corruption functions, vectorised over a [tokens, hidden] embedding tensor.

Only the rows selected by `mask` change; the others are returned bit-identical. Arithmetic
runs in float32 and the result is cast back to the input dtype (the model's, e.g. bf16).
All randomness comes from the caller's generator, so a keyed generator makes the
corruption a pure function of (key, prompt).
"""
from __future__ import annotations

import torch

from corruption.spec import CorruptionSpec


def corrupt(embeds: torch.Tensor, spec: CorruptionSpec, mask: torch.Tensor,
            generator: torch.Generator) -> torch.Tensor:
    if embeds.ndim != 2:
        raise ValueError(f"expected [tokens, hidden] embeddings, got shape {tuple(embeds.shape)}")
    if mask.shape != (embeds.shape[0],) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool vector of length {embeds.shape[0]}")
    spec.check_hidden_size(embeds.shape[1])
    rows = mask.nonzero().squeeze(1)
    out = embeds.clone()
    if rows.numel() == 0:
        return out
    selected = embeds[rows].float()
    out[rows] = _apply(selected, spec, generator).to(embeds.dtype)
    return out


def _apply(x: torch.Tensor, spec: CorruptionSpec, generator: torch.Generator) -> torch.Tensor:
    tokens, hidden = x.shape
    method = spec.method
    if method == "gaussian_first_n":
        sigma = torch.as_tensor(spec.sigma, dtype=torch.float32)  # scalar or one per dimension
        x[:, :spec.dims] += torch.randn(tokens, spec.dims, generator=generator) * sigma
    elif method == "gaussian_top_k":
        _add_at(x, _top_k(x, spec.dims), torch.randn(tokens, spec.dims, generator=generator) * spec.sigma)
    elif method == "gaussian_random_n":
        dims = torch.randperm(hidden, generator=generator)[:spec.dims]
        x[:, dims] += torch.randn(tokens, spec.dims, generator=generator) * spec.sigma
    elif method == "zero_first_n":
        x[:, :spec.dims] = 0.0
    elif method == "zero_top_k":
        x.scatter_(1, _top_k(x, spec.dims), 0.0)
    elif method == "flip_sign_first_n":
        x[:, :spec.dims] *= -1.0
    elif method == "flip_sign_top_k":
        index = _top_k(x, spec.dims)
        x.scatter_(1, index, -x.gather(1, index))
    elif method == "add_value":
        x += spec.value
    elif method == "subtract_value":
        x -= spec.value
    elif method == "reverse_order":
        x = x.flip(0)
    elif method == "shuffle":
        x = x[torch.randperm(tokens, generator=generator)]
    else:  # the schema admits no other method; this guards against a schema change
        raise ValueError(f"unknown corruption method {method}")
    return x


def _top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, the indices of its k largest-magnitude dimensions."""
    return x.abs().topk(k, dim=1).indices


def _add_at(x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    x.scatter_(1, index, x.gather(1, index) + values)
