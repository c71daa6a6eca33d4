"""The harness's metrics, pure functions of outputs (no endpoints here)."""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from corruption.counterfactual import by_kind
from corruption.fluency import is_degenerate
from corruption.probes import Probe, answer_probability
from stats.intervals import wilson_interval

# What a refusal says: a tell that the answer was withheld, which a model that never read the target would
# not give (it would guess, or write something else).
_REFUSAL = re.compile(r"\b(I'?m sorry|I am sorry|I can(?:no|'|’)t|I (?:do not|don'?t|don’t) know|"
                      r"I'?m (?:not able|unable)|I am (?:not able|unable)|not able to (?:help|discuss|share))\b",
                      re.IGNORECASE)


def rate(successes: float, n: int) -> dict[str, float | list[float] | int]:
    """A proportion with its Wilson 95% interval (or a mean of n values in [0, 1], their sum as successes)."""
    return {"rate": successes / n if n else 0.0, "n": n, "successes": successes,
            "ci": list(wilson_interval(successes, n)) if n else [0.0, 1.0]}


def answer_rate(probes: Sequence[Probe], outputs: Sequence[str]) -> dict:
    return rate(sum(p.answered_by(o) for p, o in zip(probes, outputs, strict=True)), len(probes))


def answer_rate_by_kind(probes: Sequence[Probe], outputs: Sequence[str]) -> dict[str, dict]:
    """The answer rate per probe kind (corruption/counterfactual.py), "unsorted" for probes without one."""
    hits = by_kind(probes, [p.answered_by(o) for p, o in zip(probes, outputs, strict=True)])
    return {kind: rate(sum(h), len(h)) for kind, h in hits.items()}


def answer_probability_by_kind(probes: Sequence[Probe], logprobs: Sequence[Mapping[str, Any] | None],
                               spellings: Callable[[Probe], Sequence[Sequence[str]]]) -> dict[str, dict]:
    """Per probe kind, the mean probability of continuing with the answer (`corruption.probes.answer_probability`,
    from each reply's logprobs; `spellings` gives a probe's answers in the model's tokens), as a rate: its
    interval is the Wilson interval of the mean, conservative for values in [0, 1]."""
    values = by_kind(probes, [answer_probability(spellings(p), {"logprobs": lp})
                              for p, lp in zip(probes, logprobs, strict=True)])
    return {kind: rate(float(sum(v)), len(v)) for kind, v in values.items()}


def identity_rate(outputs: Sequence[str], reference: Sequence[str]) -> dict:
    return rate(sum(a == b for a, b in zip(outputs, reference, strict=True)), len(reference))


def refusal_rate(outputs: Sequence[str]) -> dict:
    """The share of outputs that refuse or profess not to know."""
    return rate(sum(bool(_REFUSAL.search(o)) for o in outputs), len(outputs))


def degenerate_share(outputs: Sequence[str]) -> dict:
    """The share of outputs that are empty or loop (corruption/fluency.py), with its interval."""
    return rate(sum(map(is_degenerate, outputs)), len(outputs))
