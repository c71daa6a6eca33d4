"""Exact input embeddings, read straight from a model's safetensors.

Only the input-embedding matrix is memory-mapped (never the whole model), and rows are
scaled the way the architecture scales them before its first layer, so that sending
`embed(ids)` as `prompt_embeds` is equivalent to sending `ids` themselves.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

# Checkpoint names of the input-embedding matrix, most common first.
EMBEDDING_TENSOR_NAMES = (
    "model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
    "transformer.wte.weight",
)

# Architectures whose input embeddings are multiplied by sqrt(hidden_size), in the model dtype.
_SQRT_HIDDEN_SCALED = {
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",
}
# Architectures that feed the embedding rows unchanged.
_UNSCALED = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
}

_SAFETENSORS_DTYPES = {
    "BF16": (np.uint16, torch.bfloat16),
    "F16": (np.float16, torch.float16),
    "F32": (np.float32, torch.float32),
}


class EmbeddingError(ValueError):
    """The model directory does not let us reproduce its input embeddings."""


def architecture_scale(config: dict) -> float | None:
    """The input scale an architecture applies, or None if we do not know it."""
    architectures = config.get("architectures") or []
    text_config = config.get("text_config") or config
    if any(a in _SQRT_HIDDEN_SCALED for a in architectures):
        return math.sqrt(text_config["hidden_size"])
    if any(a in _UNSCALED for a in architectures):
        return 1.0
    return None


class EmbeddingTable:
    """Row lookup in a memory-mapped input-embedding matrix, scaled as the model does."""

    def __init__(self, matrix: np.memmap, dtype: torch.dtype, scale: float, source: Path):
        self._matrix = matrix
        self.dtype = dtype
        self.scale = scale
        self.source = source
        self.vocab_size, self.hidden_size = matrix.shape
        # The model multiplies by a scalar stored in its own dtype, so round it the same way.
        self._scale_tensor = torch.tensor(scale, dtype=dtype) if scale != 1.0 else None

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        scale: float | None = None,
        tensor_name: str | None = None,
    ) -> "EmbeddingTable":
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise EmbeddingError(f"{model_dir} has no config.json; is it a Hugging Face model directory?")
        config = json.loads(config_path.read_text())
        if scale is None:
            scale = architecture_scale(config)
            if scale is None:
                raise EmbeddingError(
                    f"unknown architecture {config.get('architectures')!r}: its input-embedding scale is not "
                    "known here; state it in the configuration (embedding_scale, e.g. 1.0 for none)"
                )
        file, name = _locate_tensor(model_dir, tensor_name)
        matrix, dtype = _memmap_tensor(file, name)
        return cls(matrix, dtype, scale, file)

    def embed(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Embeddings [len(token_ids), hidden_size] in the model dtype, scaled."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError("token_ids must be a flat sequence")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range for a vocabulary of {self.vocab_size}")
        rows = torch.from_numpy(np.ascontiguousarray(self._matrix[ids]))
        if self.dtype == torch.bfloat16:
            rows = rows.view(torch.bfloat16)
        return rows * self._scale_tensor if self._scale_tensor is not None else rows


def _locate_tensor(model_dir: Path, tensor_name: str | None) -> tuple[Path, str]:
    names = (tensor_name,) if tensor_name else EMBEDDING_TENSOR_NAMES
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        for name in names:
            if name in weight_map:
                return model_dir / weight_map[name], name
    else:
        for file in sorted(model_dir.glob("*.safetensors")):
            header, _ = _read_header(file)
            for name in names:
                if name in header:
                    return file, name
    raise EmbeddingError(f"no input-embedding tensor ({', '.join(names)}) in the safetensors of {model_dir}")


def _read_header(file: Path) -> tuple[dict, int]:
    """The safetensors JSON header and the byte offset where tensor data begins."""
    with file.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length)), 8 + length


def _memmap_tensor(file: Path, name: str) -> tuple[np.memmap, torch.dtype]:
    header, data_start = _read_header(file)
    entry = header[name]
    if entry["dtype"] not in _SAFETENSORS_DTYPES:
        raise EmbeddingError(f"{name} in {file} has dtype {entry['dtype']}; supported: BF16, F16, F32")
    np_dtype, torch_dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
    begin, _ = entry["data_offsets"]
    matrix = np.memmap(file, dtype=np_dtype, mode="r", offset=data_start + begin, shape=tuple(entry["shape"]))
    return matrix, torch_dtype
