"""Cheaper ways to build the flagged request, measured next to the proxy's own (comparison only).

The proxy encodes `prompt_embeds` with `corruption.payload.encode_prompt_embeds` (zip
`torch.save`, standard-library base64) and then `json.dumps` the whole request body, which
scans the multi-megabyte base64 string once more for characters to escape. The variants here
produce what vLLM decodes the same way (`pybase64.b64decode(validate=True)` then
`torch.load(weights_only=True)`), only cheaper:

- `encode_zip_pybase64`: the same zip file, base64 by pybase64 (SIMD; already a vLLM dependency);
- `encode_legacy_pybase64`: torch's legacy (non-zip) file, which also skips the zip container
  and its CRC-32 pass; `torch.load` still reads it, but it is the older format;
- `request_body_bytes`: the JSON body with the base64 string spliced in unescaped (base64's
  alphabet needs no JSON escaping), instead of `json.dumps` over it.
"""
from __future__ import annotations

import io
import json
from typing import Any

import pybase64
import torch


def _check_shape(embeds: torch.Tensor) -> None:
    if embeds.ndim != 2:
        raise ValueError(f"prompt embeddings must be [tokens, hidden], got shape {tuple(embeds.shape)}")


def encode_zip_pybase64(embeds: torch.Tensor) -> str:
    _check_shape(embeds)
    buffer = io.BytesIO()
    torch.save(embeds.contiguous(), buffer)
    return pybase64.b64encode_as_string(buffer.getbuffer())


def encode_legacy_pybase64(embeds: torch.Tensor) -> str:
    _check_shape(embeds)
    buffer = io.BytesIO()
    torch.save(embeds.contiguous(), buffer, _use_new_zipfile_serialization=False)
    return pybase64.b64encode_as_string(buffer.getbuffer())


def request_body_bytes(body: dict[str, Any], prompt_embeds: str) -> bytes:
    """`json.dumps({**body, "prompt_embeds": prompt_embeds}).encode()`, without re-scanning the payload."""
    if "prompt_embeds" in body:
        raise ValueError("body already has prompt_embeds")
    head = json.dumps(body).encode()
    separator = b'"prompt_embeds": "' if head == b"{}" else b', "prompt_embeds": "'
    return b"".join((head[:-1], separator, prompt_embeds.encode("ascii"), b'"}'))


def decode_as_vllm(payload: str | bytes) -> torch.Tensor:
    """What vLLM does with a `prompt_embeds` string (vllm/renderers/embed_utils.py), minus its checks."""
    raw = pybase64.b64decode(payload, validate=True)
    return torch.load(io.BytesIO(raw), weights_only=True, map_location=torch.device("cpu"))
