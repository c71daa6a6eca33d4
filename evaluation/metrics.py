"""The harness's metrics, pure functions of outputs (no endpoints here)."""
from __future__ import annotations

import re
from collections.abc import Sequence

from stats.intervals import wilson_interval
from corruption.counterfactual import by_kind
from corruption.probes import Probe

_WORD = re.compile(r"\w+", re.UNICODE)


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased word tokens: longest common subsequence against both lengths."""
    a, b = _WORD.findall(candidate.lower()), _WORD.findall(reference.lower())
    if not a or not b:
        return 0.0
    lcs = _lcs_length(a, b)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rate(successes: int, n: int) -> dict[str, float | list[float] | int]:
    """A proportion with its Wilson 95% interval."""
    return {"rate": successes / n if n else 0.0, "n": n, "successes": successes,
            "ci": list(wilson_interval(successes, n)) if n else [0.0, 1.0]}


def answer_rate(probes: Sequence[Probe], outputs: Sequence[str]) -> dict:
    return rate(sum(p.answered_by(o) for p, o in zip(probes, outputs, strict=True)), len(probes))


def answer_rate_by_kind(probes: Sequence[Probe], outputs: Sequence[str]) -> dict[str, dict]:
    """The answer rate per probe kind (corruption/counterfactual.py), "unsorted" for probes without one."""
    hits = by_kind(probes, [p.answered_by(o) for p, o in zip(probes, outputs, strict=True)])
    return {kind: rate(sum(h), len(h)) for kind, h in hits.items()}


def identity_rate(outputs: Sequence[str], reference: Sequence[str]) -> dict:
    return rate(sum(a == b for a, b in zip(outputs, reference, strict=True)), len(reference))


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
