"""Speculative dispatch: the request goes to vLLM while the guard decides, and its output is held.

`Speculation` sends the request as the client asked for it (a stream stays a stream, a whole body
stays a whole body), then reads vLLM's answer into a buffer, and nothing more, until the verdict:

- unflagged: `release()` gives vLLM's response (its status and media type) and `body()` its bytes,
  the held ones first and then the rest, exactly as vLLM sent them;
- flagged, refused, failed, or the client gone: `abort()` closes the connection, and vLLM aborts a
  request whose client closed the connection (streaming or not). Nothing held is ever looked at
  again except to count what was wasted.

`accepted()` tells when vLLM has taken the request in (a stream's headers, a whole body's request written):
the caller starts its classifier then, so that its CPU does not delay the request's way into vLLM.

The buffer is bounded (`HoldLimits`): past its bytes or its stream events the reader stops reading
and the answer waits in vLLM's socket until the verdict. It never releases anything on its own.

The reader runs as a task of its own, one step at a time (open, or read one chunk). A step in flight
when the verdict comes is shielded from the reader's cancellation, so `release()` and `body()` take
it over where it is: held bytes go out at once, without waiting for vLLM's next chunk.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

from vllm_client import AsyncVllmClient, BackendUnavailable, UpstreamResponse


@dataclass(frozen=True)
class HoldLimits:
    """How much of an unverified answer the proxy keeps: bytes, and stream events (one per generated
    token at vLLM's default `--stream-interval 1`; an event in a non-streaming body is not counted)."""

    max_bytes: int
    max_events: int


class Speculation:
    def __init__(self, upstream: AsyncVllmClient, path: str, body: dict[str, Any], limits: HoldLimits):
        self.limits = limits
        self.started = time.perf_counter()
        self.first_output_at: float | None = None  # when vLLM's first body bytes reached the proxy
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.held_events = 0
        self.limit_reached = False
        self.response: UpstreamResponse | None = None
        self._error: BackendUnavailable | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._ended = False  # vLLM's body was read to its end
        self._stream = False
        self._tail = b""
        self._pending: asyncio.Future[None] | None = None
        self._closed = False
        self._accepted = asyncio.Event()
        self._reader = asyncio.create_task(self._read(upstream, path, body))
        self._reader.add_done_callback(lambda _: self._accepted.set())  # failed or cancelled: nothing to wait for

    async def accepted(self, timeout: float) -> None:
        """Returns once vLLM has taken the request in (or it failed), or after `timeout` seconds. A stream is
        taken in when its headers come: vLLM sends them once it has tokenized the prompt and queued it for
        its engine. A whole body's headers come with the answer, so that request counts once it is sent."""
        try:
            async with asyncio.timeout(timeout):  # no task of its own, unlike wait_for: this is every request's path
                await self._accepted.wait()
        except TimeoutError:
            pass

    # --- the reader, before the verdict -----------------------------------------------------

    async def _read(self, upstream: AsyncVllmClient, path: str, body: dict[str, Any]) -> None:
        await self._step(self._open(upstream, path, body))
        while self.response is not None and not (self._ended or self._error):
            if self.held_bytes >= self.limits.max_bytes or self.held_events >= self.limits.max_events:
                self.limit_reached = True  # the stream waits for the verdict; vLLM's bytes stay in its socket
                return
            await self._step(self._next())

    async def _step(self, work: Coroutine[Any, Any, None]) -> None:
        self._pending = asyncio.ensure_future(work)
        await asyncio.shield(self._pending)  # cancelling the reader leaves the step running
        self._pending = None

    async def _open(self, upstream: AsyncVllmClient, path: str, body: dict[str, Any]) -> None:
        try:
            response = await upstream.open("POST", path, body,
                                           on_sent=None if body.get("stream") else self._accepted.set)
        except BackendUnavailable as exc:
            self._error = exc
            return
        self.response, self._stream = response, response.is_stream
        self._accepted.set()
        self._chunks = response.raw()

    async def _next(self) -> None:
        assert self._chunks is not None
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self._ended = True
            return
        except BackendUnavailable as exc:
            self._error = exc
            return
        if self.first_output_at is None:
            self.first_output_at = time.perf_counter()
        self.held.append(chunk)
        self.held_bytes += len(chunk)
        if self._stream:  # "data:" is 5 bytes: a 4-byte tail catches one split across two chunks, once
            self.held_events += (self._tail + chunk).count(b"data:")
            self._tail = chunk[-4:]

    async def _stop_reader(self) -> None:
        if not self._reader.done():
            self._reader.cancel()
        await asyncio.wait([self._reader])

    # --- after the verdict -------------------------------------------------------------------

    async def release(self) -> UpstreamResponse:
        """Unflagged: vLLM's response (status, media type), once it has come; BackendUnavailable if none
        came. Its bytes are `body()`."""
        await self._stop_reader()
        if self.response is None and self._pending is not None:
            await asyncio.wait([self._pending])  # the request is still being sent, or its headers awaited
        if self.response is None:
            raise self._error or BackendUnavailable("the model backend is unreachable")
        return self.response

    async def body(self) -> AsyncIterator[bytes]:
        """vLLM's body, byte for byte: what was held, then the rest as it comes; BackendUnavailable if
        vLLM fails mid-answer. The connection is closed at the end, or when the consumer stops."""
        try:
            sent = 0
            while sent < len(self.held):  # a step in flight may add one more while these go out
                yield self.held[sent]
                sent += 1
            if self._pending is not None and not self._pending.done():
                await asyncio.wait([self._pending])
            for chunk in self.held[sent:]:
                yield chunk
            self.held = []
            if self._error is not None:
                raise self._error
            if not self._ended and self._chunks is not None:
                async for chunk in self._chunks:
                    yield chunk
        finally:
            await self.abort()

    async def abort(self) -> None:
        """Close the request, wherever it is: vLLM aborts it (and stops generating) when the connection
        closes. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        await self._stop_reader()
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
            await asyncio.wait([self._pending])
        if self._chunks is not None:
            try:
                await self._chunks.aclose()  # type: ignore[attr-defined]
            except (BackendUnavailable, RuntimeError):
                pass
        if self.response is not None:
            await self.response.aclose()

    def generated_tokens_seen(self) -> int:
        """Tokens of the answer that reached the proxy before the abort: a lower bound of what vLLM
        generated (it may have generated more that never left its socket)."""
        data = b"".join(self.held)
        if not data:
            return 0
        if not self._stream:
            try:
                return int(json.loads(data)["usage"]["completion_tokens"])
            except (ValueError, KeyError, TypeError):
                return 0
        tokens = 0
        for line in data.split(b"\n"):
            if not line.startswith(b"data: {"):
                continue
            try:
                event = json.loads(line[6:])
            except ValueError:
                continue  # the last event may be cut off
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                if choice.get("text") or delta.get("content") or delta.get("reasoning_content") \
                        or delta.get("reasoning"):
                    tokens += 1
        return tokens
