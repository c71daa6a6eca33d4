"""Speculative dispatch on the real backend (issue 14): vLLM really stops generating a speculative
request when its prompt is flagged and when the client leaves, read from vLLM's own
`vllm:num_requests_running`; flagged answers are the same as in sequential mode.

The app runs in-process (served by uvicorn in a thread, or through Starlette's test client) with a
keyword gate that can be made slow, so that the speculative request is surely generating when the
verdict comes; its upstream is the real vLLM. The backend may serve others meanwhile (it is shared),
so the running-requests gauge is read by its minimum over a window (others only add to it), and the
generated-token counter only over windows in which no other request finished. Byte-for-byte checks
compare the client's bytes with the bytes vLLM sent for that very request (a tee on the proxy's
connection), not with a second generation, which other requests batched alongside may change.
"""
from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest
import uvicorn
from inprocess import KeywordGate, build_app
from starlette.testclient import TestClient

from vllm_client.server import free_port

pytestmark = pytest.mark.backend

FLAGGED_PROMPT = "Harry Potter's best friends are Ron Weasley and"  # the keyword gate flags "harry potter"
UNFLAGGED_PROMPT = "Write a very long story about a lighthouse."
LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}  # runs for over a minute at ~20 tokens/s


class SlowGate(KeywordGate):
    def __init__(self, delay: float):
        self.delay = delay
        self.verdict_at: float | None = None

    def score_segments(self, segments: list[str], stop_above: float | None = None) -> float:
        time.sleep(self.delay)
        self.verdict_at = time.monotonic()
        return super().score_segments(segments)


class Served:
    """The app behind a real socket (uvicorn in a thread), so a client can really hang up."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def vllm_gauges(backend_url: str) -> tuple[float, float, float]:
    """vLLM's requests running now, the tokens it has generated so far (counted as they come), and the
    requests it has finished (aborted ones are not counted there)."""
    text = httpx.get(f"{backend_url}/metrics", timeout=10).text

    def total(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))
    return (total("vllm:num_requests_running"), total("vllm:generation_tokens_total"),
            total("vllm:request_success_total"))


def running(backend_url: str) -> float:
    return vllm_gauges(backend_url)[0]


class Sampler:
    """`vllm:num_requests_running` and `vllm:generation_tokens_total` every 0.1 s, with monotonic
    timestamps, until stopped."""

    def __init__(self, backend_url: str):
        self.url, self.samples, self.tokens, self.finished = backend_url, [], [], []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            at, (now_running, generated, finished) = time.monotonic(), vllm_gauges(self.url)
            self.samples.append((at, now_running))
            self.tokens.append((at, generated))
            self.finished.append((at, finished))
            time.sleep(0.1)

    def generated(self, start: float, end: float) -> float:
        """Tokens vLLM generated between two moments (from the samples nearest inside them)."""
        inside = [value for at, value in self.tokens if start <= at <= end]
        return inside[-1] - inside[0]

    def quiet(self, start: float, end: float) -> bool:
        """No other request finished in vLLM between these moments (ours are aborted, not finished)."""
        inside = [value for at, value in self.finished if start - 0.2 <= at <= end + 0.2]
        return inside[-1] == inside[0]

    def least(self, start: float, end: float) -> float:
        """The fewest requests running in vLLM between two moments: ours, whatever others add."""
        values = self.between(start, end)
        assert values, (start, end, self.samples)
        return min(values)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join(5)

    def between(self, start: float, end: float) -> list[float]:
        return [value for at, value in self.samples if start <= at <= end]


def wait_idle(backend_url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while running(backend_url) > 0:
        assert time.monotonic() < deadline, "the backend is busy with other requests"
        time.sleep(0.2)


def _request(url: str, prompt: str, stream: bool, leave_after: float) -> dict:
    """Send a long completion; a streaming client reads until `leave_after` seconds, then hangs up; a
    non-streaming one gives up (read timeout) then. What the client saw."""
    body = {"model": "gemma-3-270m", "prompt": prompt, "stream": stream, **LONG}
    seen: dict = {"started": time.monotonic(), "first_byte_at": None, "text": ""}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body,
                          timeout=httpx.Timeout(leave_after, connect=5)) as response:
            seen["status"], seen["flagged"] = response.status_code, response.headers.get("x-eco-flagged")
            for line in response.iter_lines():
                seen["first_byte_at"] = seen["first_byte_at"] or time.monotonic()
                if line.startswith("data: {"):
                    seen["text"] += "".join(c.get("text", "") for c in json.loads(line[6:])["choices"])
                if time.monotonic() - seen["started"] > leave_after:
                    break
    except httpx.TimeoutException:
        seen["timed_out"] = True
    seen["left_at"] = time.monotonic()
    return seen


@pytest.mark.parametrize("stream", [True, False])
def test_a_flagged_speculative_request_stops_in_vllm(backend, stream):
    """The speculative request generates while the gate decides (slowly, here: 2 s); at the flagged
    verdict it is aborted, within a bound, and only the corrupted request runs; when the client
    leaves, that one stops too."""
    gate = SlowGate(2.0)
    app = build_app(backend.model_dir, backend.url, gate=gate)
    wait_idle(backend.url)
    with Served(app) as url, Sampler(backend.url) as sampler:
        seen = _request(url, FLAGGED_PROMPT, stream, leave_after=6.0)
        time.sleep(2.0)
    assert gate.verdict_at is not None
    started, verdict, left = seen["started"], gate.verdict_at, seen["left_at"]
    # The speculative one was generating up to the verdict. (Its first step may come late on a loaded
    # machine, so the gauge is read over the last half second before the verdict only.)
    assert sampler.least(verdict - 0.6, verdict - 0.1) >= 1, sampler.samples
    assert sampler.generated(started, verdict) > 5
    # From a second after the verdict the corrupted one runs alone: the speculative one stopped (were it
    # still running, two would run all along).
    assert sampler.least(verdict + 1.0, left - 0.1) == 1, sampler.samples
    assert sampler.least(left + 1.0, left + 2.0) == 0, sampler.samples  # the client left: nothing of ours runs
    if sampler.quiet(left + 1.0, left + 2.0):  # ... and nothing generates (when nobody else is served)
        assert sampler.generated(left + 1.0, left + 2.0) == 0
    if stream:
        assert seen["status"] == 200 and seen["flagged"] == "true"
        assert seen["first_byte_at"] > verdict and seen["text"] and "Hermione" not in seen["text"]
    metrics = app.state.proxy.metrics.registry  # (waste is counted off the answer's path: long done by now)
    assert metrics.get_sample_value("eco_speculative_wasted_total", {"target": "harry_potter"}) == 1
    # a stream's first token reached the proxy before the verdict; a whole body only comes at its end
    assert metrics.get_sample_value("eco_speculative_requests_total", {"first": "output" if stream else "verdict"}) == 1
    if stream:
        assert metrics.get_sample_value("eco_speculative_wasted_generated_tokens_total",
                                        {"target": "harry_potter"}) > 5


@pytest.mark.parametrize("prompt", [UNFLAGGED_PROMPT, FLAGGED_PROMPT])
@pytest.mark.parametrize("stream", [True, False])
def test_a_client_leaving_before_the_verdict_stops_the_speculative_request(backend, stream, prompt):
    gate = SlowGate(4.0)
    app = build_app(backend.model_dir, backend.url, gate=gate)
    wait_idle(backend.url)
    with Served(app) as url, Sampler(backend.url) as sampler:
        seen = _request(url, prompt, stream, leave_after=2.0)  # no answer can begin before the verdict
        time.sleep(4.0)
    left = seen["left_at"]
    assert seen.get("timed_out") and seen["first_byte_at"] is None
    assert sampler.least(left - 0.6, left - 0.1) >= 1, sampler.samples  # it was generating when the client left
    assert sampler.generated(seen["started"], left) > 3
    assert sampler.least(left + 1.0, left + 5.0) == 0, sampler.samples  # stopped; nothing sent after the verdict
    if sampler.quiet(left + 1.0, left + 5.0):
        assert sampler.generated(left + 1.0, left + 5.0) == 0
    assert app.state.proxy.metrics.registry.get_sample_value("eco_client_gone_total") == 1


class Tee(httpx.AsyncBaseTransport):
    """The proxy's connection to vLLM, recording each request's body and the exact bytes vLLM answered."""

    def __init__(self):
        self.inner = httpx.AsyncHTTPTransport()
        self.exchanges: list[tuple[str, dict, list[bytes]]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        response = await self.inner.handle_async_request(request)
        received: list[bytes] = []
        if request.method == "POST":
            self.exchanges.append((request.url.path, json.loads(body), received))
        return httpx.Response(response.status_code, headers=response.headers,
                              stream=_TeeStream(response.stream, received), extensions=response.extensions)


class _TeeStream(httpx.AsyncByteStream):
    def __init__(self, inner, received: list[bytes]):
        self.inner, self.received = inner, received

    async def __aiter__(self):
        async for chunk in self.inner:
            self.received.append(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


def _teed_client(backend, **options) -> tuple[TestClient, Tee]:
    from vllm_client import AsyncVllmClient

    app = build_app(backend.model_dir, backend.url, **options)
    tee = Tee()
    app.state.proxy.upstream = AsyncVllmClient(backend.url, transport=tee)
    return TestClient(app), tee


@pytest.mark.parametrize("path,payload", [
    ("/v1/completions", {"prompt": "The capital of Japan is"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name three fruits."}]}),
])
@pytest.mark.parametrize("stream", [False, True])
def test_unflagged_answers_are_vllms_bytes(backend, path, payload, stream):
    """A streaming client gets vLLM's chunks, a non-streaming one vLLM's own non-streaming body: the very
    bytes vLLM sent for the request, which went in the client's own mode."""
    body = {"model": "gemma-3-270m", "max_tokens": 12, "temperature": 0, "stream": stream, **payload}
    client, tee = _teed_client(backend)
    through = client.post(path, json=body)
    assert through.status_code == 200 and through.headers["x-eco-flagged"] == "false"
    [(sent_path, sent, received)] = [e for e in tee.exchanges if e[0] != "/v1/models"]
    assert sent_path == path and sent["stream"] is stream  # one request: the speculative one, released
    assert through.content == b"".join(received)
    assert through.headers["content-type"] == ("text/event-stream; charset=utf-8" if stream else "application/json")


def _tensor(encoded: str):
    import base64
    import io

    import torch
    return torch.load(io.BytesIO(base64.b64decode(encoded)), weights_only=True)


def _without_ids(raw: bytes) -> bytes:
    return re.sub(rb'"created":\s*\d+', b'"created":0',
                  re.sub(rb'"id":\s*"[^"]*"', b'"id":""', raw))


@pytest.mark.parametrize("stream", [False, True])
def test_flagged_answers_are_the_same_in_both_modes(backend, stream):
    """Same key and prompt: speculative mode sends the very corrupted request sequential mode sends, and
    gets the same answer (a second try or two when other requests batched alongside changed a greedy
    step of either run on the shared backend)."""
    import torch

    body = {"model": "gemma-3-270m", "prompt": FLAGGED_PROMPT, "max_tokens": 12, "temperature": 0,
            "stream": stream}
    for _attempt in range(3):
        answers, corrupted = {}, {}
        for dispatch in ("sequential", "speculative"):
            client, tee = _teed_client(backend, dispatch=dispatch)
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200 and response.headers["x-eco-flagged"] == "true"
            [sent] = [sent for _, sent, _ in tee.exchanges if "prompt_embeds" in sent]
            corrupted[dispatch] = (_tensor(sent.pop("prompt_embeds")), sent)
            answers[dispatch] = _without_ids(response.content)
        assert torch.equal(corrupted["sequential"][0], corrupted["speculative"][0])
        assert corrupted["sequential"][1] == corrupted["speculative"][1]
        assert b"Hermione" not in answers["speculative"]
        if answers["sequential"] == answers["speculative"]:
            return
    assert answers["sequential"] == answers["speculative"]
