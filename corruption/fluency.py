"""A cheap fluency check of generated texts: is the corrupted model still writing language?"""
from __future__ import annotations

from collections import Counter


def fluency_report(texts: list[str]) -> dict[str, float]:
    """Share of empty outputs, mean unique-word ratio, and share of degenerate repetitive outputs.

    An output is repetitive when one word 3-gram occurs three times or more in it.
    """
    if not texts:
        return {"n": 0, "empty_rate": 0.0, "mean_unique_word_ratio": 0.0, "repetitive_rate": 0.0}
    words = [t.split() for t in texts]
    nonempty = [w for w in words if w]
    ratios = [len(set(w)) / len(w) for w in nonempty]
    repetitive = sum(_has_repeated_trigram(w) for w in nonempty)
    return {
        "n": len(texts),
        "empty_rate": 1 - len(nonempty) / len(texts),
        "mean_unique_word_ratio": sum(ratios) / len(ratios) if ratios else 0.0,
        "repetitive_rate": repetitive / len(texts),
    }


def degenerate_rate(texts: list[str]) -> float:
    """Share of outputs that are empty or repetitive (as in `fluency_report`): what a model that writes
    language, knowing the answer or not, does not produce."""
    if not texts:
        raise ValueError("the degenerate rate needs at least one text")
    return sum(map(is_degenerate, texts)) / len(texts)


def is_degenerate(text: str) -> bool:
    """Empty, or one word 3-gram three times or more."""
    words = text.split()
    return not words or _has_repeated_trigram(words)


def _has_repeated_trigram(words: list[str]) -> bool:
    counts = Counter(tuple(words[i:i + 3]) for i in range(len(words) - 2))
    return bool(counts) and max(counts.values()) >= 3
