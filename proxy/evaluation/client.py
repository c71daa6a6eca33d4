"""An OpenAI-compatible endpoint as the harness sees it: greedy text in, text and the guard's headers out."""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
from tqdm import tqdm


class EndpointError(RuntimeError):
    """The endpoint is unreachable or refused a request the harness considers valid."""


@dataclass(frozen=True)
class Reply:
    text: str
    flagged: bool | None  # the proxy's x-eco-flagged header; None when absent (a raw backend)
    target: str | None


class Endpoint:
    def __init__(self, base_url: str, model: str | None = None, concurrency: int = 8, timeout: float = 600.0):
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.client = httpx.Client(base_url=self.base_url, timeout=timeout,
                                   limits=httpx.Limits(max_connections=concurrency))
        self.concurrency = concurrency
        self.model = model or self._served_model()

    def _served_model(self) -> str:
        try:
            response = self.client.get("/v1/models")
            response.raise_for_status()
            return response.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise EndpointError(f"cannot list the models of {self.base_url}: {exc}") from exc

    def complete(self, prompts: Sequence[str], max_tokens: int, desc: str, one_at_a_time: bool = False) -> list[Reply]:
        """Greedy completions. `one_at_a_time`: no two requests in flight, so the backend never batches them
        (batch composition can change a greedy output on vLLM's CPU build), for output-identity comparisons."""
        bodies = [{"model": self.model, "prompt": p, "max_tokens": max_tokens, "temperature": 0} for p in prompts]
        return self._run("/v1/completions", bodies, desc, lambda c: c["text"], 1 if one_at_a_time else self.concurrency)

    def chat(self, conversations: Sequence[list[dict[str, str]]], max_tokens: int, desc: str) -> list[Reply]:
        bodies = [{"model": self.model, "messages": m, "max_tokens": max_tokens, "temperature": 0}
                  for m in conversations]
        return self._run("/v1/chat/completions", bodies, desc, lambda c: c["message"]["content"] or "",
                         self.concurrency)

    def _run(self, path: str, bodies: list[dict[str, Any]], desc: str, text_of, concurrency: int) -> list[Reply]:
        with ThreadPoolExecutor(concurrency) as pool, tqdm(total=len(bodies), desc=desc, leave=False) as bar:
            def one(body: dict[str, Any]) -> Reply:
                try:
                    response = self.client.post(path, json=body)
                except httpx.HTTPError as exc:
                    raise EndpointError(f"{self.base_url}{path} unreachable: {exc}") from exc
                if response.status_code != 200:
                    raise EndpointError(f"{self.base_url}{path} answered {response.status_code}: {response.text[:300]}")
                bar.update()
                flag = response.headers.get("x-eco-flagged")
                return Reply(text_of(response.json()["choices"][0]), None if flag is None else flag == "true",
                             response.headers.get("x-eco-target") or None)
            return list(pool.map(one, bodies))

    def close(self) -> None:
        self.client.close()
