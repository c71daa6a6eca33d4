"""An OpenAI-compatible endpoint as the harness sees it (vLLM or the proxy, through `vllm_client`): greedy
text in, text and the guard's headers out; `vllm_client.BackendError` when a request fails."""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from vllm_client import VllmClient


@dataclass(frozen=True)
class Reply:
    text: str
    flagged: bool | None  # the proxy's x-eco-flagged header; None when absent (a raw backend)
    target: str | None
    logprobs: dict[str, Any] | None = None  # the choice's logprobs when asked for, in the completions' shape


class Endpoint:
    def __init__(self, base_url: str, model: str | None = None, concurrency: int = 8, timeout: float = 600.0):
        self.client = VllmClient(base_url, timeout=timeout, max_connections=concurrency)
        self.base_url = self.client.base_url
        self.concurrency = concurrency
        self.model = model or self.client.served_model()

    def complete(self, prompts: Sequence[str], max_tokens: int, desc: str, one_at_a_time: bool = False,
                 logprobs: int | None = None) -> list[Reply]:
        """Greedy completions. `one_at_a_time`: no two requests in flight, so the backend never batches them
        (batch composition can change a greedy output on vLLM's CPU build), for output-identity comparisons.
        `logprobs`: the top tokens' logprobs at each position, in each reply."""
        asked = {} if logprobs is None else {"logprobs": logprobs}
        bodies = [{"model": self.model, "prompt": p, "max_tokens": max_tokens, "temperature": 0, **asked}
                  for p in prompts]
        return self._run("/v1/completions", bodies, desc, lambda c: c["text"], 1 if one_at_a_time else self.concurrency)

    def chat(self, conversations: Sequence[list[dict[str, str]]], max_tokens: int, desc: str,
             continue_final_message: bool = False, logprobs: int | None = None) -> list[Reply]:
        """Greedy chat answers. `continue_final_message`: each conversation ends with the start of the
        assistant's answer, which the model goes on with (vLLM's parameter of that name). `logprobs`: as in
        `complete`, each reply's logprobs turned into the completions' shape."""
        continuation = ({"add_generation_prompt": False, "continue_final_message": True}
                        if continue_final_message else {})
        asked = {} if logprobs is None else {"logprobs": True, "top_logprobs": logprobs}
        bodies = [{"model": self.model, "messages": m, "max_tokens": max_tokens, "temperature": 0, **continuation,
                   **asked} for m in conversations]
        return self._run("/v1/chat/completions", bodies, desc, lambda c: c["message"]["content"] or "",
                         self.concurrency)

    def _run(self, path: str, bodies: list[dict[str, Any]], desc: str, text_of, concurrency: int) -> list[Reply]:
        with ThreadPoolExecutor(concurrency) as pool, tqdm(total=len(bodies), desc=desc, leave=False) as bar:
            def one(body: dict[str, Any]) -> Reply:
                reply = self.client.post_json(path, body)
                bar.update()
                flag = reply.headers.get("x-eco-flagged")
                choice = reply.body["choices"][0]
                return Reply(text_of(choice), None if flag is None else flag == "true",
                             reply.headers.get("x-eco-target") or None, _completion_shaped(choice.get("logprobs")))
            return list(pool.map(one, bodies))

    def close(self) -> None:
        self.client.close()


def _completion_shaped(logprobs: dict[str, Any] | None) -> dict[str, Any] | None:
    """A choice's logprobs as /v1/completions gives them (the tokens written, and the top tokens at each
    position as {token: logprob}); a chat's per-token entries are turned into that shape."""
    if not logprobs or "content" not in logprobs:
        return logprobs
    entries = logprobs["content"] or []
    return {"tokens": [entry["token"] for entry in entries],
            "token_logprobs": [entry["logprob"] for entry in entries],
            "top_logprobs": [{top["token"]: top["logprob"] for top in entry.get("top_logprobs") or []}
                             for entry in entries]}
