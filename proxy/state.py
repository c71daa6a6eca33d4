"""Everything a request needs, in one object the app holds; the policy is swapped whole on reload."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from classifier.encoder import EncoderPool
from corruption.embedding_check import EmbeddingCheck, EmbeddingCheckResult, EmbeddingCheckUnavailable
from proxy.guard import Guard
from proxy.observability import AuditLog, Metrics
from proxy.policy import ActivePolicy, PolicyError, load_policy
from proxy.prompts import PromptBuilder
from proxy.tool_calls import BackendToolCalls, probe
from vllm_client import AsyncVllmClient, BackendRefused, BackendUnavailable

log = logging.getLogger(__name__)

BODY_BYTES_PER_TOKEN = 32  # the default body limit: generous for any text or token-id prompt that fits the context
BODY_BYTES_BASE = 64 * 1024  # plus room for tools, documents and parameters


@dataclass
class ProxyState:
    """Everything a request needs; the policy is swapped whole on reload."""

    policy: ActivePolicy
    policy_path: str
    served_model_name: str
    builder: PromptBuilder
    guard: Guard
    upstream: AsyncVllmClient
    metrics: Metrics
    audit: AuditLog
    encoders: EncoderPool  # kept across reloads; it runs on the guard's torch executor
    admin_key: str | None = None
    api_keys: tuple[str, ...] = ()  # client keys for /v1/*; empty: no key needed
    metrics_key: str | None = None  # bearer key for /metrics; unset: /metrics is off
    max_body_bytes: int | None = None  # None: sized from the backend's context length
    classify_timeout: float = 10.0  # seconds; a slower verdict counts as a classifier failure (fail mode)
    max_model_len: int | None = None  # asked of the backend when first needed
    # Does the backend read the proxy's embeddings as it reads text? Checked at start, after a policy
    # reload and after the backend was seen down; None: no check configured (in-process tests).
    embedding_checker: EmbeddingCheck | None = None
    embedding_check: EmbeddingCheckResult | None = None
    tool_calls: BackendToolCalls | None = None  # what the backend does with tool choices; asked when first needed
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _check_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def record_embedding_check(self, result: EmbeddingCheckResult) -> None:
        """The result where /ready reads it, and in the `eco_embedding_check` gauge."""
        self.embedding_check = result
        self.metrics.embedding_check.set(result.gauge_value)

    def backend_lost(self) -> None:
        """A restarted backend may be another vLLM: check it again before trusting it with embeddings, and
        ask it again what it does with tool choices."""
        self.tool_calls = None
        check = self.embedding_check
        if check is not None and check.status == "passed":
            self.record_embedding_check(EmbeddingCheckResult.pending(
                self.upstream.base_url, self.guard.embeddings, self.served_model_name))

    async def embeddings_trusted(self) -> bool:
        """True when the last check passed (or was skipped on purpose); a pending check runs first."""
        check = self.embedding_check
        if check is None or check.ok:
            return True
        if check.status == "pending":
            await self.recheck_embeddings()
        return self.embedding_check is not None and self.embedding_check.ok

    async def recheck_embeddings(self) -> None:
        if self.embedding_checker is None or self.embedding_check is None or self.embedding_check.status == "skipped":
            return
        async with self._check_lock:
            try:
                result = await asyncio.to_thread(self.embedding_checker.run, self.upstream.base_url)
            except EmbeddingCheckUnavailable as exc:
                log.warning("embedding check postponed: %s", exc)
                return
            self.record_embedding_check(result)
            (log.info if result.ok else log.error)("%s", result.message)

    async def context_length(self) -> int:
        if self.max_model_len is None:
            try:
                self.max_model_len = await self.upstream.context_length(self.served_model_name)
            except BackendRefused:
                raise BackendUnavailable("the model backend does not report a context length") from None
        return self.max_model_len

    async def backend_tool_calls(self) -> BackendToolCalls:
        if self.tool_calls is None:
            self.tool_calls = await probe(self.upstream, self.served_model_name)
            log.info("the backend's tool calling: %s", self.tool_calls)
        return self.tool_calls

    async def body_limit(self) -> int:
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return BODY_BYTES_BASE + BODY_BYTES_PER_TOKEN * await self.context_length()

    async def reload(self) -> ActivePolicy:
        """Load the policy file again; on any error the running policy stays in force."""
        async with self._reload_lock:
            try:
                policy = await run_in_threadpool(load_policy, self.policy_path, self.encoders,
                                                  self.guard.embeddings.hidden_size)
            except PolicyError:
                self.metrics.reloads.labels("rejected").inc()
                raise
            self.policy = policy
            self.metrics.reloads.labels("applied").inc()
            log.info("policy %s loaded from %s", policy.version, policy.source)
        await self.recheck_embeddings()
        return policy
