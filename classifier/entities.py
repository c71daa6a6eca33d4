"""The target's key terms: names, places, spells... frequent in the forget data, rare in retain.

Candidates are capitalised words and runs of two or three capitalised words (a proper noun
is what an entity scope should hit, not "the" or "wizard"). Each is ranked by the log ratio
of its smoothed document frequency in forget prompts to that in retain prompts.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

_WORD = re.compile(r"[A-Za-z][\w-]*(?:'[A-Za-z]+)?")
_STOP = frozenset("""
a an and are as at be but by can could describe did do does explain for from give had has have he her his how i if
in is it its list me my name no not of on or please she should summarise summarize tell that the their them then
there these they this to was we were what when where which who whom whose why will with would write you your yes
""".split())


def _capitalised_terms(text: str) -> set[str]:
    """Capitalised words and runs of up to three of them, possessives dropped."""
    words = [w.removesuffix("'s") for w in _WORD.findall(text)]
    terms: set[str] = set()
    run: list[str] = []
    for word in words + [""]:
        if word[:1].isupper() and word.lower() not in _STOP:
            run.append(word)
            continue
        for size in (1, 2, 3):
            terms.update(" ".join(run[i:i + size]) for i in range(len(run) - size + 1))
        run = []
    return terms


def _document_frequency(texts: Iterable[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(_capitalised_terms(text))
    return counts


def distinctive_terms(forget_texts: Sequence[str], retain_texts: Sequence[str], top_k: int = 40,
                      min_count: int = 3) -> list[str]:
    forget, retain = _document_frequency(forget_texts), _document_frequency(retain_texts)
    lowered_retain = _document_frequency(t.title() for t in retain_texts)  # "hogwarts" in retain counts too
    n_forget, n_retain = max(len(forget_texts), 1), max(len(retain_texts), 1)

    def log_ratio(term: str) -> float:
        in_retain = max(retain[term], lowered_retain[term.title()])
        return math.log((forget[term] + 0.5) / (n_forget + 1)) - math.log((in_retain + 0.5) / (n_retain + 1))

    candidates = [t for t, c in forget.items() if c >= min_count and log_ratio(t) > math.log(4)]
    return sorted(candidates, key=lambda t: (-log_ratio(t), -forget[t], t))[:top_k]
