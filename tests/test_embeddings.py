"""The embedding lookup on small synthetic checkpoints (the real model is covered by test_parity)."""
from __future__ import annotations

import base64
import io
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from corruption.embeddings import EmbeddingError, EmbeddingTable
from vllm_client.embeds import encode_prompt_embeds, prompt_embeds_base64, request_body_with_embeds

pytestmark = pytest.mark.unit


def _checkpoint(path, architecture: str, matrix: torch.Tensor, name: str = "model.embed_tokens.weight",
                sharded: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": [architecture], "hidden_size": matrix.shape[1]}))
    other = {"model.norm.weight": torch.ones(matrix.shape[1], dtype=matrix.dtype)}
    if sharded:
        save_file(other, path / "model-00001-of-00002.safetensors")
        save_file({name: matrix}, path / "model-00002-of-00002.safetensors")
        weight_map = {"model.norm.weight": "model-00001-of-00002.safetensors",
                      name: "model-00002-of-00002.safetensors"}
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file({**other, name: matrix}, path / "model.safetensors")
    return path


def test_gemma_rows_scaled_by_sqrt_hidden_in_model_dtype(tmp_path):
    matrix = torch.randn(50, 16).to(torch.bfloat16)
    table = EmbeddingTable.from_model_dir(_checkpoint(tmp_path, "Gemma3ForCausalLM", matrix))
    ids = [3, 0, 49, 3]
    expected = matrix[ids] * torch.tensor(math.sqrt(16), dtype=torch.bfloat16)
    got = table.embed(ids)
    assert got.dtype == torch.bfloat16 and got.shape == (4, 16)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"])
def test_unscaled_families_return_rows_unchanged(tmp_path, architecture):
    matrix = torch.randn(20, 8, dtype=torch.float32)
    table = EmbeddingTable.from_model_dir(_checkpoint(tmp_path, architecture, matrix))
    assert table.scale == 1.0 and table.dtype == torch.float32
    assert torch.equal(table.embed([1, 2, 19]), matrix[[1, 2, 19]])


def test_sharded_checkpoint_and_other_tensor_name(tmp_path):
    matrix = torch.randn(30, 8).to(torch.float16)
    path = _checkpoint(tmp_path, "Qwen2ForCausalLM", matrix, name="model.language_model.embed_tokens.weight",
                       sharded=True)
    table = EmbeddingTable.from_model_dir(path)
    assert table.source.name == "model-00002-of-00002.safetensors"
    assert torch.equal(table.embed([7]), matrix[[7]])


def test_unknown_architecture_named_in_error_unless_scale_given(tmp_path):
    matrix = torch.randn(10, 4)
    path = _checkpoint(tmp_path, "MysteryForCausalLM", matrix)
    with pytest.raises(EmbeddingError, match="MysteryForCausalLM"):
        EmbeddingTable.from_model_dir(path)
    table = EmbeddingTable.from_model_dir(path, scale=2.0)
    assert torch.equal(table.embed([1]), matrix[[1]] * 2.0)


def test_out_of_range_ids_and_missing_tensor(tmp_path):
    table = EmbeddingTable.from_model_dir(_checkpoint(tmp_path / "a", "LlamaForCausalLM", torch.randn(10, 4)))
    with pytest.raises(ValueError, match="out of range"):
        table.embed([10])
    with pytest.raises(EmbeddingError, match="no input-embedding tensor"):
        EmbeddingTable.from_model_dir(_checkpoint(tmp_path / "b", "LlamaForCausalLM", torch.randn(10, 4),
                                                  name="lm_head.weight"))


def test_payload_round_trips_as_vllm_reads_it():
    embeds = torch.randn(5, 8).to(torch.bfloat16)
    raw = base64.b64decode(encode_prompt_embeds(embeds))
    # vLLM's own reading of the field (weights_only: no code runs on load).
    restored = torch.load(io.BytesIO(raw), weights_only=True)
    assert restored.dtype == torch.bfloat16 and torch.equal(restored, embeds)
    with pytest.raises(ValueError):
        encode_prompt_embeds(embeds[0])


@pytest.mark.parametrize("body", [{}, {"model": "m", "stream": True, "max_tokens": 8, "stop": ["\"", "é"]}])
@pytest.mark.parametrize("count", [1, 3])
def test_request_body_parts_join_to_json_dumps(body, count):
    payloads = [prompt_embeds_base64(torch.randn(3, 8).to(torch.bfloat16)) for _ in range(count)]
    value = payloads[0] if count == 1 else payloads
    as_text = payloads[0].decode() if count == 1 else [p.decode() for p in payloads]
    assert b"".join(request_body_with_embeds(body, value)) == json.dumps({**body, "prompt_embeds": as_text}).encode()
    with pytest.raises(ValueError, match="already"):
        request_body_with_embeds({"prompt_embeds": "x"}, value)
