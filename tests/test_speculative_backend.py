"""Speculative dispatch on the real backend (issue 14): vLLM really stops generating a speculative
request when its prompt is flagged and when the client leaves, read from vLLM's own metrics; flagged
answers are the same as in sequential mode.

The app runs in-process (served by uvicorn in a thread, or through Starlette's test client) with a
keyword gate that the test holds, so that the speculative request is surely generating when the
verdict comes; its upstream is the real vLLM, idle when a test begins (the session's backend serves
one test at a time). Each step waits for what it expects up to a generous bound instead of reading
fixed time windows: a loaded machine can answer `/metrics` seconds late, and a speculative request
that is not aborted would run for over a minute, far past any bound. Byte-for-byte checks compare the
client's bytes with the bytes vLLM sent for that very request (a tee on the proxy's connection), not
with a second generation, which other requests batched alongside may change.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

import h11
import httpx
import pytest
import uvicorn
from inprocess import KeywordGate, build_app
from starlette.applications import Starlette
from starlette.testclient import TestClient

from vllm_client.server import free_port

pytestmark = pytest.mark.backend

FLAGGED_PROMPT = "Harry Potter's best friends are Ron Weasley and"  # the keyword gate flags "harry potter"
UNFLAGGED_PROMPT = "Write a very long story about a lighthouse."
LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}  # runs for over a minute at ~20 tokens/s
BOUND = 30.0  # seconds any awaited change may take on a loaded machine (the abort itself takes ~0.1 s)
HELD_GATE_DEADLINE = 4 * BOUND  # the proxy's classification deadline: the held gate, not the deadline, decides


@dataclass(frozen=True)
class Gauges:
    """vLLM's metrics at one moment: the requests it holds (running or waiting), the tokens it has taken
    in as prompts and generated so far (counted as they come)."""

    at: float
    requests: float
    prompt_tokens: float
    generated: float
    ran_to_length: float  # requests that generated all their max_tokens (an aborted one is not counted)


def gauges(backend_url: str) -> Gauges:
    text = httpx.get(f"{backend_url}/metrics", timeout=30).text

    def total(name: str, label: str = "") -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and label in line)
    return Gauges(time.monotonic(), total("vllm:num_requests_running") + total("vllm:num_requests_waiting"),
                  total("vllm:prompt_tokens_total"), total("vllm:generation_tokens_total"),
                  total("vllm:request_success_total", 'finished_reason="length"'))


def wait_for(backend_url: str, condition: Callable[[Gauges], bool], what: str, bound: float = BOUND) -> Gauges:
    """The first reading of vLLM's metrics that meets the condition, within `bound` seconds."""
    deadline, seen = time.monotonic() + bound, []
    while time.monotonic() < deadline:
        seen.append(gauges(backend_url))
        if condition(seen[-1]):
            return seen[-1]
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {bound} s; vLLM showed, last: {seen[-5:]}")


class HeldGate(KeywordGate):
    """The keyword gate, held by the test: it gives its verdict only when released (a classifier that
    takes as long as the test needs), and reads vLLM's metrics just before."""

    def __init__(self, backend_url: str):
        self.backend_url = backend_url
        self.asked, self.release, self.decided = threading.Event(), threading.Event(), threading.Event()
        self.at_verdict: Gauges | None = None

    def score_segments(self, segments: list[str], stop_above: float | None = None) -> float:
        self.asked.set()
        self.release.wait(3 * BOUND)  # longer than any wait of the test, shorter than the proxy's deadline
        try:
            self.at_verdict = gauges(self.backend_url)
        finally:
            self.decided.set()
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


class HangingClient:
    """A client on a plain socket that hangs up when the test says (a streaming client and one waiting
    for a whole body alike), keeping what it was sent: status, headers, the streamed text and the
    moment of the first body byte."""

    def __init__(self, url: str, body: dict):
        address = urlsplit(url)
        self.sock = socket.create_connection((address.hostname, address.port), timeout=5)
        self.sock.settimeout(None)
        self.connection = h11.Connection(h11.CLIENT)
        payload = json.dumps(body).encode()
        self.sock.sendall(self.connection.send(h11.Request(
            method="POST", target="/v1/completions",
            headers=[("host", address.netloc), ("content-type", "application/json"),
                     ("content-length", str(len(payload)))])) + self.connection.send(h11.Data(data=payload)))
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body, self.first_byte_at, self.left_at = b"", None, None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            while (data := self.sock.recv(65536)):
                self.connection.receive_data(data)
                while (event := self.connection.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
                    if isinstance(event, h11.Response):
                        self.status = event.status_code
                        self.headers = {k.decode(): v.decode() for k, v in event.headers}
                    elif isinstance(event, h11.Data):
                        self.first_byte_at = self.first_byte_at or time.monotonic()
                        self.body += event.data
        except OSError:
            pass  # the test hung up

    @property
    def text(self) -> str:
        return "".join(choice.get("text", "") for line in self.body.decode(errors="replace").splitlines()
                       if line.startswith("data: {") for choice in json.loads(line[6:])["choices"])

    def leave(self) -> None:
        self.left_at = time.monotonic()
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.reader.join(5)


def _speculating(backend_url: str, url: str, gate: HeldGate, prompt: str, stream: bool, before: Gauges,
                 tokens: int, app: Starlette) -> HangingClient:
    """A long request sent, asked of the held gate, and generating in vLLM (`tokens` so far) as the
    speculative request."""
    client = HangingClient(url, {"model": "gemma-3-270m", "prompt": prompt, "stream": stream, **LONG})
    assert gate.asked.wait(BOUND)
    try:  # vLLM publishes its gauges as its engine steps: a stalled engine shows nothing new for a while
        wait_for(backend_url, lambda g: g.requests == 1 and g.generated - before.generated >= tokens,
                 "the speculative request generates", bound=2 * BOUND)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {what_happened(client, app)}") from None
    return client


def what_happened(client: HangingClient, app: Starlette) -> str:
    """What the client got and the proxy's non-zero counters, to tell in a failure message what it did."""
    counts = {f"{sample.name}{sample.labels}": sample.value for family in app.state.proxy.metrics.registry.collect()
              for sample in family.samples if sample.name.endswith("_total") and sample.value}
    return f"the client got {client.status} {client.body[:300]!r}; the proxy counted {counts}"


def _stays_idle(backend_url: str, before: Gauges) -> Gauges:
    """Nothing runs in vLLM, nothing is generated over the next second, and no request ran to its length
    since `before`: ours were stopped, not finished (a counter, unlike the running-requests gauge, does not
    depend on when vLLM's metrics were read, and a fast machine could finish a request inside the wait)."""
    idle = wait_for(backend_url, lambda g: g.requests == 0, "vLLM stops every request of ours")
    time.sleep(1.0)
    later = gauges(backend_url)
    assert later.requests == 0 and later.generated == idle.generated, (idle, later)
    assert later.ran_to_length == before.ran_to_length, (before, later)
    return later


@pytest.mark.parametrize("stream", [True, False])
def test_a_flagged_speculative_request_stops_in_vllm(backend, stream):
    """The speculative request generates while the gate decides; at the flagged verdict it is aborted,
    within a bound, and only the corrupted request runs; when the client leaves, that one stops too."""
    gate = HeldGate(backend.url)
    app = build_app(backend.model_dir, backend.url, gate=gate, classify_timeout=HELD_GATE_DEADLINE)
    before = wait_for(backend.url, lambda g: g.requests == 0, "the backend is idle")
    with Served(app) as url:
        client = _speculating(backend.url, url, gate, FLAGGED_PROMPT, stream, before, tokens=10, app=app)
        try:
            gate.release.set()
            assert gate.decided.wait(BOUND)
            at_verdict = gate.at_verdict
            assert at_verdict.generated - before.generated >= 10, at_verdict
            # vLLM takes the corrupted request's prompt and holds that one request alone: the speculative one
            # stopped (were it running still, two would show until its 1,500 tokens were done).
            alone = wait_for(backend.url, lambda g: g.prompt_tokens > at_verdict.prompt_tokens and g.requests == 1,
                             "the corrupted request runs alone")
            wait_for(backend.url, lambda g: g.requests == 1 and g.generated > alone.generated,
                     "the corrupted request runs on, alone")
            if stream:
                deadline = time.monotonic() + BOUND
                while not client.text and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert client.status == 200 and client.headers["x-eco-flagged"] == "true"
                assert client.first_byte_at > gate.at_verdict.at and client.text and "Hermione" not in client.text
            else:
                # a whole body comes at the end of its 1,500 tokens
                assert client.first_byte_at is None, what_happened(client, app)
        finally:
            client.leave()  # a failed check must not leave the corrupted request running into the next test
        # The client left: nothing of ours runs, and neither request ran to its 1,500 tokens: the speculative
        # one was aborted (by the verdict, the proxy counts), the corrupted one when the client left.
        _stays_idle(backend.url, before)
    metrics = app.state.proxy.metrics.registry  # (waste is counted off the answer's path: long done by now)
    assert metrics.get_sample_value("eco_speculative_aborted_total", {"reason": "flagged"}) == 1
    assert metrics.get_sample_value("eco_speculative_wasted_total", {"target": "harry_potter"}) == 1
    # a stream's first token reached the proxy before the verdict; a whole body only comes at its end
    assert metrics.get_sample_value("eco_speculative_requests_total", {"first": "output" if stream else "verdict"}) == 1
    if stream:
        wasted = metrics.get_sample_value("eco_speculative_wasted_generated_tokens_total", {"target": "harry_potter"})
        # at most what vLLM generated in all by the time the corrupted request ran alone (the proxy reads on
        # from the verdict's reading of the metrics until it aborts)
        assert 1 <= wasted <= alone.generated - before.generated


@pytest.mark.parametrize("prompt", [UNFLAGGED_PROMPT, FLAGGED_PROMPT])
@pytest.mark.parametrize("stream", [True, False])
def test_a_client_leaving_before_the_verdict_stops_the_speculative_request(backend, stream, prompt):
    gate = HeldGate(backend.url)
    app = build_app(backend.model_dir, backend.url, gate=gate, classify_timeout=HELD_GATE_DEADLINE)
    before = wait_for(backend.url, lambda g: g.requests == 0, "the backend is idle")
    with Served(app) as url:
        client = _speculating(backend.url, url, gate, prompt, stream, before, tokens=3, app=app)
        client.leave()
        assert client.first_byte_at is None  # no answer can begin before the verdict
        _stays_idle(backend.url, before)
        gate.release.set()  # the verdict comes after the client left: nothing is sent upstream then
        assert gate.decided.wait(BOUND)
        _stays_idle(backend.url, before)
    assert not gate.at_verdict.requests
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
