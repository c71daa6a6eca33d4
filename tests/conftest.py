"""Session-wide real backends.

`backend` is vLLM serving gemma-3-270m with prompt embeddings enabled, started once for the
whole session (or an already running one named by ECO_TEST_BACKEND_URL and
ECO_TEST_MODEL_DIR). `tiny_llama_backend` is a second vLLM serving a small randomly
initialised Llama that the tests build, for the second-architecture parity check and for
the tests that kill and restart a backend.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from vllm_client.server import VllmServer
from proxy.model_prep import DEFAULT_MODEL_NAME, prepare_default_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class Backend:
    url: str
    model_dir: Path
    served_model_name: str
    server: VllmServer | None = None  # None when the backend is external


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Unmarked tests are integration tests: they need a backend.
    for item in items:
        if "unit" not in item.keywords and "backend" not in item.keywords:
            item.add_marker(pytest.mark.backend)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The prepared default model (its tokenizer and embedding table), for in-process tests."""
    return prepare_default_model()


@pytest.fixture(scope="session")
def backend(tmp_path_factory: pytest.TempPathFactory):
    external = os.environ.get("ECO_TEST_BACKEND_URL")
    if external:
        yield Backend(external, Path(os.environ["ECO_TEST_MODEL_DIR"]), DEFAULT_MODEL_NAME)
        return
    model_dir = prepare_default_model()
    server = VllmServer(model_dir, DEFAULT_MODEL_NAME, log_path=tmp_path_factory.mktemp("vllm") / "vllm.log")
    with server:
        yield Backend(server.url, model_dir, DEFAULT_MODEL_NAME, server)


def build_tiny_llama(out_dir: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer Llama with random weights and the Gemma tokenizer, saved in bf16."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,  # head_dim 64: vLLM CPU attention needs it
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    # Wider random rows than the default init, so greedy decoding varies with the prompt.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama_backend(backend: Backend, tmp_path_factory: pytest.TempPathFactory):
    model_dir = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), backend.model_dir)
    server = VllmServer(model_dir, "tiny-llama", log_path=model_dir.parent / "vllm-tiny.log",
                        max_model_len=1024, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    with server:
        yield Backend(server.url, model_dir, "tiny-llama", server)


@pytest.fixture(scope="session")
def tool_parser_backend(backend: Backend, tmp_path_factory: pytest.TempPathFactory):
    """A vLLM whose tool-call parser (pythonic) reads forced calls as JSON, started without JSON whitespace so
    that a forced call's output is fixed by its schema; or an already running one named by
    ECO_TEST_TOOL_BACKEND_URL (same model, started with the same arguments)."""
    external = os.environ.get("ECO_TEST_TOOL_BACKEND_URL")
    if external:
        yield Backend(external, backend.model_dir, DEFAULT_MODEL_NAME)
        return
    server = VllmServer(backend.model_dir, DEFAULT_MODEL_NAME, log_path=tmp_path_factory.mktemp("vllm") / "tools.log",
                        extra_args=TOOL_PARSER_ARGS, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    with server:
        yield Backend(server.url, backend.model_dir, DEFAULT_MODEL_NAME, server)


TOOL_PARSER_ARGS = ["--enable-auto-tool-choice", "--tool-call-parser", "pythonic",
                    "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
