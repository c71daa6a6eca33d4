"""Deterministic noise: the generator is seeded by an HMAC of the prompt under a secret key.

The same prompt always receives the same corruption (answers are reproducible and cacheable,
and a client gains nothing by retrying to average the noise away), while without the key
nobody can predict, and so subtract, the noise.
"""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import numpy as np
import torch


def keyed_generator(secret_key: bytes, token_ids: Sequence[int], target: str) -> torch.Generator:
    if not secret_key:
        raise ValueError("the corruption secret key is empty")
    message = target.encode() + b"\0" + np.asarray(token_ids, dtype="<i8").tobytes()
    digest = hmac.new(secret_key, message, hashlib.sha256).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)  # seed must fit int64
