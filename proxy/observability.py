"""Prometheus metrics and the JSONL audit log: one line per request (every prompt's decision in it),
nothing of the prompt's text by default."""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Per-target counters and histograms, in a registry of their own (no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("eco_requests", "Requests classified, by endpoint and target that decided",
                                ["endpoint", "target"], registry=self.registry)
        self.flagged = Counter("eco_flagged", "Requests flagged and corrupted, by target", ["target"],
                               registry=self.registry)
        self.classifier_errors = Counter("eco_classifier_errors", "Classifier failures, by target and fail mode",
                                         ["target", "fail_mode"], registry=self.registry)
        self.refused = Counter("eco_refused", "Requests refused before classification (bypass attempts, bad input)",
                               ["reason"], registry=self.registry)
        self.backend_errors = Counter("eco_backend_unavailable", "Requests answered 503: backend unreachable",
                                      registry=self.registry)
        self.reloads = Counter("eco_policy_reloads", "Policy reloads by result", ["result"], registry=self.registry)
        self.classifier_latency = Histogram("eco_classifier_seconds", "Classifier latency per request, by target",
                                            ["target"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.added_latency = Histogram("eco_added_latency_seconds",
                                       "The guard's time: from the request's arrival to its plan (sequential: before vLLM is asked; "
                                       "speculative: beside vLLM), by path and deciding target",
                                       ["path", "target"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        # Speculative dispatch (policy `dispatch: speculative`).
        self.speculative = Counter("eco_speculative_requests",
                                   "Speculative requests by what reached the proxy first: the verdict or vLLM's "
                                   "first output (the verdict-before-first-token rate is first=verdict over all)",
                                   ["first"], registry=self.registry)
        self.speculation_skipped = Counter("eco_speculation_skipped",
                                           "Requests sent only after the verdict in speculative mode: the prompt "
                                           "names a term of a target's vocabulary, so it is flagged for sure",
                                           registry=self.registry)
        self.hold_seconds = Histogram("eco_hold_seconds",
                                      "How long vLLM's output was held waiting for the verdict (0: the verdict "
                                      "came first), by path", ["path"], buckets=(0.0,) + _LATENCY_BUCKETS,
                                      registry=self.registry)
        self.hold_limit = Counter("eco_hold_limit_reached",
                                  "Speculative answers that filled the hold buffer before the verdict (they waited)",
                                  registry=self.registry)
        self.wasted = Counter("eco_speculative_wasted", "Speculative requests aborted because the prompt was flagged",
                              ["target"], registry=self.registry)
        self.wasted_prompt_tokens = Counter("eco_speculative_wasted_prompt_tokens",
                                            "Prompt tokens of speculative requests aborted as flagged", ["target"],
                                            registry=self.registry)
        self.wasted_generated_tokens = Counter("eco_speculative_wasted_generated_tokens",
                                               "Generated tokens of speculative requests aborted as flagged, as far "
                                               "as they reached the proxy (a lower bound)", ["target"],
                                               registry=self.registry)
        self.speculative_aborted = Counter("eco_speculative_aborted",
                                           "Speculative requests aborted in vLLM, by reason "
                                           "(flagged, refused, failed, client_gone)", ["reason"], registry=self.registry)
        self.client_gone = Counter("eco_client_gone", "Clients that left before their answer began",
                                   registry=self.registry)
        self.embedding_check = Gauge("eco_embedding_check",
                                     "Backend reads the proxy's embeddings as its text: 1 passed, 0 failed, "
                                     "-1 skipped (--skip-embedding-check), NaN not run yet", registry=self.registry)
        self.embedding_check.set(math.nan)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def prompt_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class AuditLog:
    """Appends one JSON object per line; `-` means standard output, None disables it. Lines are
    written in order by a thread of their own, so a slow disk never holds up the event loop."""

    def __init__(self, destination: str | None):
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="audit")
        self._stream: IO[str] | None
        if destination is None:
            self._stream = None
        elif destination == "-":
            self._stream = sys.stdout
        else:
            path = Path(destination)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._stream = path.open("a", buffering=1, encoding="utf-8")

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def write(self, record: dict[str, Any]) -> None:
        if self._stream is None:
            return
        self._writer.submit(self._append, {"time": time.time(), **record})

    def _append(self, record: dict[str, Any]) -> None:
        assert self._stream is not None
        self._stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._stream.flush()

    def close(self) -> None:
        """Writes what is queued, then closes."""
        self._writer.shutdown(wait=True)
        if self._stream not in (None, sys.stdout):
            self._stream.close()
