"""`eco-proxy serve`: the proxy in front of vLLM, started and stopped as one unit."""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import AutoTokenizer

from classifier.batching import GIL_SWITCH_INTERVAL
from classifier.encoder import DEFAULT_CACHE_SIZE, EncoderPool
from corruption.embedding_check import EmbeddingCheck, EmbeddingCheckResult, EmbeddingCheckUnavailable
from corruption.embeddings import EmbeddingError, EmbeddingTable
from corruption.prompt import special_token_ids
from proxy.app import ProxyState, create_app
from proxy.guard import Guard
from proxy.model_prep import DEFAULT_MODEL_NAME, cache_dir, prepare_default_model
from proxy.observability import AuditLog, Metrics
from proxy.policy import PolicyError, load_policy
from proxy.prompts import PromptBuilder
from vllm_client import AsyncVllmClient, BackendUnavailable, backend_is_ready
from vllm_client.server import VllmServer

log = logging.getLogger("eco-proxy")

DEFAULT_POLICY = Path(__file__).resolve().parent.parent / "demo" / "policy.yaml"


class ServeSettings(BaseModel):
    """Everything `serve` needs; each field also reads an ECO_* environment variable."""

    model_config = ConfigDict(extra="forbid")

    policy: Path = DEFAULT_POLICY
    backend_url: str | None = None  # an external vLLM; when unset, the proxy starts its own
    model_dir: Path | None = None  # when unset, the default model is prepared
    served_model_name: str = DEFAULT_MODEL_NAME
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    secret_key: str | None = Field(default=None, repr=False)
    admin_key: str | None = Field(default=None, repr=False)
    # Client keys for /v1/* (bearer tokens): repeat the option, or comma-separate them in ECO_API_KEY.
    api_key: list[str] = Field(default_factory=list, repr=False)
    api_key_file: Path | None = None  # more client keys, one per line
    upstream_api_key: str | None = Field(default=None, repr=False)  # for a vLLM started with --api-key
    metrics_key: str | None = Field(default=None, repr=False)  # bearer key for /metrics; unset: /metrics is off
    max_body_bytes: int | None = Field(default=None, ge=1024)  # unset: sized from the backend's context length
    classify_timeout: float = Field(default=10.0, gt=0)  # seconds; then the targets' fail modes decide
    audit_log: str | None = None  # a file path, or "-" for standard output
    embedding_scale: float | None = None  # only for architectures the proxy does not know
    # Start without asking the backend whether it reads the proxy's embeddings as it reads text.
    skip_embedding_check: bool = False
    classifier_cache_size: int = Field(default=DEFAULT_CACHE_SIZE, ge=0)  # texts whose encoding is kept; 0: none
    # CPU threads for the classifier and the corruption math. One suits a proxy that shares its cores with vLLM
    # (vLLM's CPU build keeps its cores busy between steps, which stalls a multi-threaded pass) or a small pod.
    torch_threads: int = Field(default=1, ge=1)
    # The CPUs the proxy runs on ("1", "2-3,6"), as `taskset -c` names them; unset: wherever the OS puts it.
    # On a CPU host, the cores vLLM's engine leaves free (its log calls them reserved_cpus): on the engine's
    # cores the classifier would slow the very prefill it runs beside.
    cpus: list[int] | None = None
    max_model_len: int = 2048  # for the vLLM the proxy starts
    vllm_args: str = ""  # extra arguments for the vLLM the proxy starts

    @field_validator("cpus", mode="before")
    @classmethod
    def _cpu_list(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        cpus: list[int] = []
        for part in value.split(","):
            first, dash, last = part.strip().partition("-")
            if not (first.isdigit() and (not dash or last.isdigit())):
                raise ValueError(f"{value!r} is not a CPU list such as 1 or 2-3,6")
            cpus += range(int(first), int(last if dash else first) + 1)
        return cpus

    @field_validator("cpus")
    @classmethod
    def _cpus_available(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("names no CPU")
        if not hasattr(os, "sched_setaffinity"):
            raise ValueError("CPU affinity cannot be set on this platform")
        available = os.sched_getaffinity(0)
        if missing := sorted(set(value) - available):
            raise ValueError(f"CPU {', '.join(map(str, missing))} is not available to this process "
                             f"(available: {', '.join(map(str, sorted(available)))})")
        return sorted(set(value))


ENV_PREFIX = "ECO_"
EXIT_EMBEDDING_CHECK_FAILED = 3


def _secret_key(configured: str | None) -> bytes:
    """The noise key: configured, or one kept in the cache so corruption stays reproducible."""
    if configured:
        return configured.encode()
    key_file = cache_dir() / "secret.key"
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        log.warning("no ECO_SECRET_KEY set: created a local noise key at %s", key_file)
    return key_file.read_text().strip().encode()


def run(settings: ServeSettings) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per backend request
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    model_dir = settings.model_dir or prepare_default_model()
    vllm: VllmServer | None = None
    previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        backend_url = settings.backend_url
        if backend_url is None:
            vllm = VllmServer(model_dir, settings.served_model_name, log_path=cache_dir() / "logs" / "vllm.log",
                              max_model_len=settings.max_model_len, extra_args=settings.vllm_args.split())
            vllm.start()
            backend_url = vllm.url
            log.info("starting vLLM at %s (log: %s); the first start compiles for about 2 minutes",
                     backend_url, vllm.log_path)
        if settings.cpus is not None:  # after vLLM is started, which must not inherit it
            _run_on(settings.cpus)
        state = _build_state(settings, model_dir, backend_url)
        if vllm is not None:
            vllm.wait_ready()
        if not _check_embeddings_at_start(state, settings, backend_url, backend_ready=vllm is not None):
            return EXIT_EMBEDDING_CHECK_FAILED
        return _serve_http(state, settings)
    except (PolicyError, EmbeddingError) as exc:
        log.error("%s", exc)
        return 2
    finally:
        if vllm is not None:
            log.info("stopping vLLM")
            vllm.stop()
        signal.signal(signal.SIGTERM, previous_sigterm)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _run_on(cpus: list[int]) -> None:
    """Every thread of the process, and so every thread it starts later, on these CPUs only."""
    for thread in os.listdir("/proc/self/task"):  # the affinity call itself moves one thread
        os.sched_setaffinity(int(thread), cpus)
    log.info("running on CPU %s", ",".join(map(str, cpus)))


def _build_state(settings: ServeSettings, model_dir: Path, backend_url: str) -> ProxyState:
    # torch's thread count is process-wide; set before the policy loads, as the gate's ONNX runtime takes it then
    torch.set_num_threads(settings.torch_threads)
    torch_thread = ThreadPoolExecutor(1, thread_name_prefix="torch")
    encoders = EncoderPool(settings.classifier_cache_size, executor=torch_thread)
    embeddings = EmbeddingTable.from_model_dir(model_dir, scale=settings.embedding_scale)
    policy = load_policy(settings.policy, encoders, embeddings.hidden_size)
    metrics = Metrics()
    audit = AuditLog(settings.audit_log)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    state = ProxyState(
        policy=policy,
        policy_path=str(settings.policy),
        served_model_name=settings.served_model_name,
        builder=PromptBuilder(tokenizer),
        guard=Guard(embeddings, _secret_key(settings.secret_key), metrics, audit, torch_executor=torch_thread,
                    special_token_ids=special_token_ids(tokenizer)),
        upstream=AsyncVllmClient(backend_url, api_key=settings.upstream_api_key),
        metrics=metrics,
        audit=audit,
        admin_key=settings.admin_key,
        api_keys=_client_keys(settings),
        metrics_key=settings.metrics_key,
        max_body_bytes=settings.max_body_bytes,
        classify_timeout=settings.classify_timeout,
        encoders=encoders,
        # What /ready shows and what a policy reload or a backend restart runs again.
        embedding_checker=EmbeddingCheck(tokenizer, embeddings, settings.served_model_name,
                                         api_key=settings.upstream_api_key),
    )
    state.record_embedding_check(EmbeddingCheckResult.pending(backend_url, embeddings, settings.served_model_name))
    return state


def _client_keys(settings: ServeSettings) -> tuple[str, ...]:
    keys = list(settings.api_key)
    if settings.api_key_file is not None:
        try:
            lines = settings.api_key_file.read_text().splitlines()
        except OSError as exc:
            raise PolicyError(f"--api-key-file: cannot read {settings.api_key_file}: {exc.strerror}") from exc
        from_file = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        if not from_file:  # an empty file must not turn the keys off
            raise PolicyError(f"--api-key-file: {settings.api_key_file} holds no key (one per line)")
        keys += from_file
    return tuple(keys)


def _check_embeddings_at_start(state: ProxyState, settings: ServeSettings, backend_url: str,
                               backend_ready: bool) -> bool:
    """Before the proxy reports ready: does the backend read our uncorrupted embeddings as it reads text?
    False: a mismatch, the start stops. A backend not reachable yet is checked as soon as it answers."""
    if settings.skip_embedding_check:
        result = EmbeddingCheckResult.skipped(state.guard.embeddings, settings.served_model_name)
        state.record_embedding_check(result)
        log.warning("!!! --skip-embedding-check / %sSKIP_EMBEDDING_CHECK is set: %s. If the backend's vLLM "
                    "scales input embeddings otherwise, every flagged prompt is corrupted wrongly and nothing "
                    "reports it. !!!", ENV_PREFIX, result.message)
        return True
    if not backend_ready and not backend_is_ready(backend_url, api_key=settings.upstream_api_key):
        log.warning("backend %s is not reachable yet; /ready reports 503 until it answers and the embedding "
                    "check has passed", backend_url)
        return True
    try:
        result = state.embedding_checker.run(backend_url)
    except EmbeddingCheckUnavailable as exc:
        log.warning("%s; it runs again once the backend answers, /ready reports 503 until then", exc)
        return True
    state.record_embedding_check(result)
    if result.status == "failed":
        log.error("%s", result.message)
        return False
    log.info("%s", result.message)
    return True


async def _check_when_backend_answers(state: ProxyState, settings: ServeSettings, server: uvicorn.Server,
                                      outcome: dict[str, int], poll: float = 5.0) -> None:
    """The start-up check for a backend that was not reachable at start: a mismatch stops the proxy."""
    while True:
        try:
            if await state.upstream.is_ready():
                result = await asyncio.to_thread(state.embedding_checker.run, state.upstream.base_url)
                break
        except BackendUnavailable:  # EmbeddingCheckUnavailable included
            pass
        await asyncio.sleep(poll)
    state.record_embedding_check(result)
    if result.status == "failed":
        log.error("%s", result.message)
        outcome["code"] = EXIT_EMBEDDING_CHECK_FAILED
        server.should_exit = True
        return
    log.info("%s", result.message)
    _print_ready(state, settings)


def _print_ready(state: ProxyState, settings: ServeSettings) -> None:
    print(f"eco-proxy ready: http://{settings.host}:{settings.port}/v1 (model {settings.served_model_name}, "
          f"policy {state.policy.version}, embedding check {state.embedding_check.status})", flush=True)


def _serve_http(state: ProxyState, settings: ServeSettings) -> int:
    outcome = {"code": 0}
    server: uvicorn.Server

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, lambda: asyncio.ensure_future(_reload_on_sighup(state)))
        waiting = None
        if state.embedding_check.status == "pending":
            print(f"eco-proxy listening on http://{settings.host}:{settings.port}; not ready until the backend "
                  "answers and the embedding check passes", flush=True)
            waiting = asyncio.create_task(_check_when_backend_answers(state, settings, server, outcome))
        else:
            _print_ready(state, settings)
        yield
        if waiting is not None:
            waiting.cancel()
        await state.upstream.aclose()
        state.audit.close()

    app = create_app(state, lifespan=lifespan)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning"))
    server.run()
    return outcome["code"]


async def _reload_on_sighup(state: ProxyState) -> None:
    try:
        await state.reload()
    except PolicyError as exc:
        log.error("SIGHUP reload rejected, policy %s stays in force: %s", state.policy.version, exc)
