"""The decision (classify a prompt against every target) and the flagged prompt's embeddings.

Rule when several targets flag one prompt: the target whose score exceeds its threshold by
the largest margin decides the corruption; on a tie, the one listed first in the policy.
A classifier failure counts as flagged for that target under `fail_mode: closed` (the
default) and as not flagged under `open`; either way it is counted and audited.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from corruption.embeddings import EmbeddingTable
from corruption.functions import corrupt
from corruption.keys import keyed_generator
from corruption.scope import entity_mask
from proxy.observability import Metrics
from proxy.policy import ActivePolicy, ActiveTarget
from proxy.prompts import Prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    target: ActiveTarget
    score: float | None  # None: the classifier failed
    flagged: bool

    @property
    def margin(self) -> float:
        return float("inf") if self.score is None else self.score - self.target.threshold


@dataclass(frozen=True)
class Decision:
    """The outcome for one prompt: the deciding target (if flagged) and every target's score."""

    verdicts: tuple[Verdict, ...]

    @property
    def deciding(self) -> Verdict | None:
        flagged = [v for v in self.verdicts if v.flagged]
        return max(flagged, key=lambda v: v.margin) if flagged else None  # max keeps the first on ties

    @property
    def flagged(self) -> bool:
        return self.deciding is not None

    @property
    def top(self) -> Verdict | None:
        """The verdict to report: the deciding one, else the closest to its threshold."""
        scored = [v for v in self.verdicts if v.score is not None]
        return self.deciding or (max(scored, key=lambda v: v.margin) if scored else None)


class Guard:
    def __init__(self, embeddings: EmbeddingTable, secret_key: bytes, metrics: Metrics):
        self.embeddings = embeddings
        self.secret_key = secret_key
        self.metrics = metrics

    def decide(self, policy: ActivePolicy, prompt: Prompt) -> Decision:
        segments = list(dict.fromkeys(prompt.segments))
        verdicts = []
        for target in policy.targets:
            started = time.perf_counter()
            try:
                score = float(target.classifier.score_segments(segments))
            except Exception:  # any failure of the gate is handled by the fail mode, never a 500
                log.exception("classifier for target %s failed", target.name)
                self.metrics.classifier_errors.labels(target.name, target.fail_mode).inc()
                verdicts.append(Verdict(target, None, target.fail_mode == "closed"))
                continue
            self.metrics.classifier_latency.labels(target.name).observe(time.perf_counter() - started)
            verdicts.append(Verdict(target, score, score > target.threshold))
        return Decision(tuple(verdicts))

    def failed(self, policy: ActivePolicy) -> Decision:
        """The decision when no verdict came in time: every target's fail mode, counted as a failure."""
        for target in policy.targets:
            self.metrics.classifier_errors.labels(target.name, target.fail_mode).inc()
        return Decision(tuple(Verdict(t, None, t.fail_mode == "closed") for t in policy.targets))

    def prompt_embeddings(self, prompt: Prompt, decision: Decision) -> torch.Tensor:
        """Exact embeddings of the prompt, corrupted by the deciding target if there is one."""
        embeds = self.embeddings.embed(prompt.token_ids)
        deciding = decision.deciding
        if deciding is None:
            return embeds
        target = deciding.target
        if target.corruption.scope == "entities":
            mask = entity_mask(prompt.offsets, prompt.text, list(target.entities)).mask
        else:
            mask = torch.ones(len(prompt.token_ids), dtype=torch.bool)
        generator = keyed_generator(self.secret_key, prompt.token_ids, target.name)
        return corrupt(embeds, target.corruption, mask, generator)
