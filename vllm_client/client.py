"""The HTTP client for vLLM's OpenAI server (or anything that answers in its shapes, like the proxy).

`AsyncVllmClient` is the one implementation: requests, bodies given as a dict or as encoded parts
(`vllm_client.embeds`), streamed responses, SSE, `/v1/models` and `/version`, and the mapping of
transport failures to `BackendUnavailable`. `VllmClient` is its synchronous facade for the batch
tools (trainer, embedding check, evaluation, benchmarks): the same async client, run on an event
loop of its own in a background thread, safe to call from many threads at once.
"""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

import vllm_client.sse as sse
from vllm_client.errors import BackendError, BackendRefused, BackendUnavailable

Body = dict[str, Any] | list[bytes] | bytes
T = TypeVar("T")
UNREACHABLE = "the model backend is unreachable"


def normalise_url(base_url: str) -> str:
    """`http://host:port`, whether given with a trailing slash or `/v1`."""
    return base_url.rstrip("/").removesuffix("/v1")


@dataclass(frozen=True)
class Reply:
    """A whole JSON answer."""

    status: int
    body: Any
    headers: Mapping[str, str]

    @property
    def text(self) -> str:
        return self.body if isinstance(self.body, str) else json.dumps(self.body)


class UpstreamResponse:
    """A response whose body is not read yet: read it, stream it, or close it (the caller must)."""

    def __init__(self, response: httpx.Response):
        self._response = response
        self.status_code = response.status_code
        self.headers: Mapping[str, str] = response.headers
        self.media_type: str | None = response.headers.get("content-type")

    @property
    def is_stream(self) -> bool:
        return bool(self.media_type and self.media_type.startswith("text/event-stream"))

    async def read(self) -> bytes:
        """The whole body, then closed; BackendUnavailable when the backend fails mid-response."""
        try:
            return await self._response.aread()
        except httpx.HTTPError as exc:
            raise BackendUnavailable("the model backend failed mid-response") from exc
        finally:
            await self._response.aclose()

    async def json(self) -> Any:
        try:
            return json.loads(await self.read())
        except ValueError as exc:
            raise BackendUnavailable("the model backend answered something that is not JSON") from exc

    async def raw(self) -> AsyncIterator[bytes]:
        """The body's bytes as they come, then closed (also when the consumer stops early, which
        aborts the request in vLLM); BackendUnavailable when the backend fails mid-stream."""
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise BackendUnavailable("the model backend failed mid-stream") from exc
        finally:
            await self._response.aclose()

    async def events(self) -> AsyncIterator[dict[str, Any] | None]:
        """Parsed SSE events (None for `[DONE]`), then closed; BackendUnavailable mid-stream."""
        try:
            async for event in sse.events(self._response.aiter_lines()):
                yield event
        except httpx.HTTPError as exc:
            raise BackendUnavailable("the model backend failed mid-stream") from exc
        finally:
            await self._response.aclose()

    async def aclose(self) -> None:
        await self._response.aclose()


class AsyncVllmClient:
    """`api_key`: the key of a vLLM started with `--api-key` (sent as a bearer token). `transport`: for
    tests, e.g. `httpx.ASGITransport` around a stub."""

    def __init__(self, base_url: str, timeout: float = 600.0, api_key: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, max_connections: int = 512,
                 connect_timeout: float = 5.0):
        self.base_url = normalise_url(base_url)
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"authorization": f"Bearer {api_key}"} if api_key else None,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=min(64, max_connections)),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def open(self, method: str, path: str, body: Body | None = None,
                   on_sent: Callable[[], None] | None = None) -> UpstreamResponse:
        """Send a request; the response comes with its body not yet read. A JSON body may come as a
        dict, as encoded bytes, or as encoded parts sent one after another (`embeds.request_body_with_embeds`).
        `on_sent` is called once the whole request is written to the backend's socket (before its answer)."""
        headers = {"content-type": "application/json"} if body is not None else {}
        content: bytes | AsyncIterator[bytes] | None = None
        if isinstance(body, dict):
            content = json.dumps(body).encode()
        elif isinstance(body, bytes):
            content = body
        elif isinstance(body, list):
            headers["content-length"] = str(sum(len(part) for part in body))
            content = _parts(body)
        extensions = {"trace": _calling_when_sent(on_sent)} if on_sent is not None else None
        request = self._client.build_request(method, path, content=content, headers=headers, extensions=extensions)
        try:
            return UpstreamResponse(await self._client.send(request, stream=True))
        except httpx.TransportError as exc:
            raise BackendUnavailable(UNREACHABLE) from exc

    async def request_json(self, method: str, path: str, body: Body | None = None) -> Reply:
        """A whole JSON answer, whatever its status; BackendUnavailable when none came."""
        response = await self.open(method, path, body)
        raw = await response.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode("utf-8", "replace")
        return Reply(response.status_code, parsed, response.headers)

    async def post_json(self, path: str, body: Body) -> Reply:
        """POST, and the answer's JSON; BackendRefused unless the status is 200."""
        reply = await self.request_json("POST", path, body)
        if reply.status != 200:
            raise BackendRefused(reply.status, reply.text, f"{self.base_url}{path}")
        return reply

    async def completions(self, body: Body) -> dict[str, Any]:
        """`/v1/completions`; the answer must hold choices."""
        answer = (await self.post_json("/v1/completions", body)).body
        if not isinstance(answer, dict) or not answer.get("choices"):
            raise BackendError(f"{self.base_url}/v1/completions answered without choices")
        return answer

    async def models(self) -> list[dict[str, Any]]:
        """The model cards of `/v1/models`."""
        reply = await self.request_json("GET", "/v1/models")
        if reply.status != 200 or not isinstance(reply.body, dict):
            raise BackendRefused(reply.status, reply.text, f"{self.base_url}/v1/models")
        return [card for card in reply.body.get("data", []) if isinstance(card, dict)]

    async def served_model(self) -> str:
        """The name of the first (with vLLM, the only) model served."""
        cards = await self.models()
        if not cards or not cards[0].get("id"):
            raise BackendError(f"{self.base_url} serves no model")
        return str(cards[0]["id"])

    async def context_length(self, model: str) -> int:
        """The served model's context length (`max_model_len` of its card)."""
        lengths = [card.get("max_model_len") for card in await self.models() if card.get("id") == model]
        if not lengths or not lengths[0]:
            raise BackendUnavailable("the model backend does not report a context length")
        return int(lengths[0])

    async def version(self) -> str:
        """vLLM's `GET /version`, or "unknown"."""
        try:
            reply = await self.request_json("GET", "/version")
        except BackendUnavailable:
            return "unknown"
        if reply.status == 200 and isinstance(reply.body, dict):
            return str(reply.body.get("version", "unknown"))
        return "unknown"

    async def is_ready(self) -> bool:
        """`/v1/models` answers 200."""
        try:
            response = await self.open("GET", "/v1/models")
            await response.aclose()
        except BackendUnavailable:
            return False
        return response.status_code == 200


def _calling_when_sent(on_sent: Callable[[], None]) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
    """An httpcore trace hook that calls `on_sent` when the request's body has been written."""

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event == "http11.send_request_body.complete":
            on_sent()

    return trace


async def _parts(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


class VllmClient:
    """The synchronous facade: each call runs the async client's method on a private event loop."""

    def __init__(self, base_url: str, timeout: float = 600.0, api_key: str | None = None,
                 max_connections: int = 64, connect_timeout: float = 5.0):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-client", daemon=True)
        self._thread.start()

        async def make() -> AsyncVllmClient:
            return AsyncVllmClient(base_url, timeout, api_key, max_connections=max_connections,
                                   connect_timeout=connect_timeout)
        self._client = self._run(make())
        self.base_url = self._client.base_url

    def _run(self, call: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(call, self._loop).result()  # type: ignore[arg-type]

    def _named(self, path: str, call: Awaitable[T]) -> T:
        """The call, with the address in an unavailability message (batch tools show it to their user)."""
        try:
            return self._run(call)
        except BackendUnavailable as exc:
            cause = exc.__cause__
            raise BackendUnavailable(f"{self.base_url}{path} unreachable: "
                                     f"{type(cause).__name__ if cause else exc}") from exc

    def request_json(self, method: str, path: str, body: Body | None = None) -> Reply:
        return self._named(path, self._client.request_json(method, path, body))

    def post_json(self, path: str, body: Body) -> Reply:
        return self._named(path, self._client.post_json(path, body))

    def completions(self, body: Body) -> dict[str, Any]:
        return self._named("/v1/completions", self._client.completions(body))

    def models(self) -> list[dict[str, Any]]:
        return self._named("/v1/models", self._client.models())

    def served_model(self) -> str:
        return self._named("/v1/models", self._client.served_model())

    def context_length(self, model: str) -> int:
        return self._named("/v1/models", self._client.context_length(model))

    def version(self) -> str:
        return self._run(self._client.version())

    def is_ready(self) -> bool:
        return self._run(self._client.is_ready())

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._client.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> "VllmClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def backend_is_ready(url: str, timeout: float = 2.0, api_key: str | None = None) -> bool:
    """One look: does `url` answer `/v1/models` with 200?"""
    with VllmClient(url, timeout=timeout, connect_timeout=timeout, api_key=api_key) as client:
        return client.is_ready()


def served_model_name(url: str, fallback: str, timeout: float = 5.0) -> str:
    """The backend's served model, or `fallback` when it cannot say."""
    try:
        with VllmClient(url, timeout=timeout) as client:
            return client.served_model()
    except BackendError:
        return fallback
