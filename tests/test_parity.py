"""The proof that the proxy embeds exactly as the model does.

Greedy output from the proxy's uncorrupted embeddings must equal the text prompt's output,
token for token, on the real backend: for completions, for chat (rendered by the proxy and
sent over the completions route), and for a second architecture family.
"""
from __future__ import annotations

import httpx
import pytest
from transformers import AutoTokenizer

from corruption.embeddings import EmbeddingTable
from vllm_client.embeds import encode_prompt_embeds
from proxy.prompts import PromptBuilder
from proxy.protocol import ChatCompletionRequest

pytestmark = pytest.mark.backend

PROMPTS = [
    "Harry Potter's best friends are Ron Weasley and",
    "The headmaster of Hogwarts is Albus",
    "Frodo Baggins carries the One",
    "The capital of Japan is",
    "The chemical symbol for gold is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "Water boils at a temperature of",
    "The three primary colours are",
    "Q: What is 12 times 12?\nA:",
    "Translate to French: 'Good morning, my friend.' ->",
    "The largest planet in the solar system is",
    "In 1969, the first person to walk on the Moon was",
    "A recipe for pancakes needs flour, eggs and",
    "The Eiffel Tower is located in",
    "   leading spaces and trailing spaces   ",
    "Ünïcödé, emoji 🦉 and punctuation!?",
    "List: 1. apples 2. pears 3.",
    "The opposite of hot is",
    "Shakespeare wrote Romeo and",
    "SELECT name FROM users WHERE",
    "Photosynthesis converts sunlight into",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Who is Harry Potter's best friend?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of Italy?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Tell me a fact about owls."}],
    [{"role": "user", "content": [{"type": "text", "text": "Describe a castle"}, {"type": "text", "text": "in Scotland."}]}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]

MAX_TOKENS = 12


def _complete(url: str, body: dict) -> dict:
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def _assert_completion_parity(backend, prompts: list[str]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(backend.model_dir)
    table = EmbeddingTable.from_model_dir(backend.model_dir)
    greedy = {"model": backend.served_model_name, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0}
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        from_text = _complete(backend.url, {**greedy, "prompt": prompt})
        from_embeds = _complete(backend.url, {**greedy, "prompt_embeds": encode_prompt_embeds(table.embed(ids))})
        assert from_embeds["logprobs"]["tokens"] == from_text["logprobs"]["tokens"], prompt
        assert from_embeds["text"] == from_text["text"]


def test_completions_parity_gemma(backend):
    assert len(PROMPTS) >= 20
    _assert_completion_parity(backend, PROMPTS)


def test_chat_parity_gemma(backend):
    """The chat route the proxy uses (template → ids → embeds → /v1/completions) equals vLLM's text chat."""
    tokenizer = AutoTokenizer.from_pretrained(backend.model_dir)
    table = EmbeddingTable.from_model_dir(backend.model_dir)
    builder = PromptBuilder(tokenizer)
    for messages in CONVERSATIONS:
        chat = {"model": backend.served_model_name, "messages": messages, "max_tokens": MAX_TOKENS,
                "temperature": 0}
        response = httpx.post(f"{backend.url}/v1/chat/completions", json=chat, timeout=120)
        assert response.status_code == 200, response.text
        expected = response.json()["choices"][0]
        prompt = builder.chat_prompt(ChatCompletionRequest.model_validate(chat))
        got = _complete(backend.url, {"model": backend.served_model_name, "max_tokens": MAX_TOKENS,
                                      "temperature": 0,
                                      "prompt_embeds": encode_prompt_embeds(table.embed(prompt.token_ids))})
        assert got["text"] == expected["message"]["content"], messages
        assert response.json()["usage"]["prompt_tokens"] == len(prompt.token_ids)


def test_completions_parity_second_architecture(tiny_llama_backend):
    assert EmbeddingTable.from_model_dir(tiny_llama_backend.model_dir).scale == 1.0
    _assert_completion_parity(tiny_llama_backend, PROMPTS)
