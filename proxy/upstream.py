"""The one HTTP client the proxy uses to talk to vLLM."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx


class BackendUnavailable(Exception):
    """vLLM could not be reached (refused, reset, timed out on connect). The message names no address:
    it is shown to clients."""


class Upstream:
    """`api_key`: the key of a vLLM started with `--api-key` (sent as a bearer token)."""

    def __init__(self, base_url: str, timeout: float = 600.0, api_key: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"authorization": f"Bearer {api_key}"} if api_key else None,
            timeout=httpx.Timeout(timeout, connect=5.0),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def open(self, method: str, path: str, body: list[bytes] | dict[str, Any] | None = None) -> httpx.Response:
        """Send a request and return the response with its body not yet read (caller closes it).
        A JSON body may come as a dict, or as encoded parts to send one after another."""
        headers = {"content-type": "application/json"} if body is not None else {}
        content: bytes | AsyncIterator[bytes] | None = None
        if isinstance(body, dict):
            content = json.dumps(body).encode()
        elif isinstance(body, list):
            headers["content-length"] = str(sum(len(part) for part in body))
            content = _parts(body)
        request = self._client.build_request(method, path, content=content, headers=headers)
        try:
            return await self._client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise BackendUnavailable("the model backend is unreachable") from exc

    async def get_json(self, path: str) -> tuple[int, Any]:
        response = await self.open("GET", path)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response.status_code, response.json()


async def _parts(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any] | None]:
    """Parsed `data:` events of an SSE stream; None stands for `[DONE]`."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        yield None if payload == "[DONE]" else json.loads(payload)
