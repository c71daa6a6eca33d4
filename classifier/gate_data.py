"""The gate's data (demo/<target>/gate/{train,test}/*.jsonl): validated records, a split by cluster,
and the augmentations made from the training split (diluted texts, obfuscated and misspelt spellings).

A cluster is the unit that must never straddle two splits (one entity, template or source), so
near-variants of one prompt cannot leak from training into calibration.
"""
from __future__ import annotations

import hashlib
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from classifier.data import json_lines

from confusable_homoglyphs.categories import alias
from confusable_homoglyphs.confusables import confusables_data

from classifier.normalize import canonical
from classifier.segments import sentence_spans, word_count

LABELS = ("forget", "retain")
GROUPS = {
    "forget": ("direct", "indirect", "multilingual", "obfuscated", "diluted", "framed", "multi_turn"),
    "retain": ("namesakes", "borrowed", "other_fiction", "long_documents", "everyday"),
}
ROLES = ("system", "user", "assistant")
_LANG = re.compile(r"[a-z]{2}")


@dataclass(frozen=True)
class GateRecord:
    text: str  # for a chat, its transcript (chat_transcript)
    label: str  # "forget" or "retain"
    group: str
    cluster: str
    lang: str | None = None
    messages: tuple[dict[str, str], ...] | None = field(default=None, hash=False)
    source: str = ""  # file name (and line) it came from


def chat_transcript(messages: Iterable[Mapping[str, str]]) -> str:
    """A chat as the gate sees it: one "role: content" line per message."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _record(raw: Any, where: str) -> GateRecord:
    def fail(reason: str) -> ValueError:
        return ValueError(f"{where}: {reason}")

    if not isinstance(raw, dict):
        raise fail("a record must be a JSON object")
    text, messages = raw.get("text"), raw.get("messages")
    if (text is None) == (messages is None):
        raise fail('a record needs exactly one of "text" and "messages"')
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise fail('"text" must be a non-empty string')
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise fail('"messages" must be a non-empty list')
        for number, message in enumerate(messages, 1):
            if (not isinstance(message, dict) or message.get("role") not in ROLES
                    or not isinstance(message.get("content"), str)):
                raise fail(f'message {number} needs a "role" in {ROLES} and a "content" string')
        if messages[-1]["role"] != "user":
            raise fail("a chat must end with a user turn")
        messages = tuple({"role": m["role"], "content": m["content"]} for m in messages)
        text = chat_transcript(messages)
    label, group, cluster, lang = raw.get("label"), raw.get("group"), raw.get("cluster"), raw.get("lang")
    if label not in LABELS:
        raise fail(f'"label" must be one of {LABELS}, got {label!r}')
    if group not in GROUPS[label]:
        raise fail(f'"group" of a {label} record must be one of {GROUPS[label]}, got {group!r}')
    if not isinstance(cluster, str) or not cluster.strip():
        raise fail('"cluster" must be a non-empty string')
    if lang is not None and (not isinstance(lang, str) or not _LANG.fullmatch(lang)):
        raise fail(f'"lang" must be an ISO 639-1 code such as "de", got {lang!r}')
    return GateRecord(text, label, group, cluster, lang, messages, where)


def load_records(directory: str | Path) -> list[GateRecord]:
    """Every record of every *.jsonl file in `directory` (sorted by name), validated."""
    directory = Path(directory)
    paths = sorted(directory.glob("*.jsonl"))
    if not paths:
        raise ValueError(f"{directory}: no .jsonl files")
    records = []
    for path in paths:
        records += [_record(raw, f"{path.name}:{number}") for number, raw in json_lines(path)]
    return records


# -- split ---------------------------------------------------------------------------------
def same_text_key(text: str) -> str:
    """A text as compared across splits: case, punctuation and spacing do not make a new prompt."""
    return " ".join(re.findall(r"\w+", text.casefold()))


def apart_from(records: Iterable[GateRecord], held_out: Iterable[GateRecord]) -> list[GateRecord]:
    """The records that share neither a cluster nor a text with `held_out` (a frozen test split)."""
    held_out = list(held_out)
    clusters = {r.cluster for r in held_out}
    texts = {same_text_key(r.text) for r in held_out}
    return [r for r in records if r.cluster not in clusters and same_text_key(r.text) not in texts]


def _rank_key(cluster: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\0{cluster}".encode("utf-8")).digest()


def _quotas(m: int, fractions: Sequence[float]) -> list[int]:
    """m clusters shared out by largest remainder, every split getting one when m allows."""
    exact = [f * m for f in fractions]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:m - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):
        if counts[i] == 0 and m >= len(counts):
            donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
            counts[donor] -= 1
            counts[i] += 1
    return counts


def split_by_cluster(records: Sequence[GateRecord], fractions: Mapping[str, float] | None = None,
                     seed: int = 0) -> dict[str, list[GateRecord]]:
    """Records split by a stable hash of their cluster (never their text), stratified by group.

    Groups are visited from the one with the fewest clusters up; a group's clusters not yet
    placed are ranked by hash and shared out so that the group's clusters meet the fractions
    (each split getting at least one cluster of a group that has as many clusters as splits).
    A cluster found in several groups is placed once, where first visited.
    """
    fractions = dict(fractions or {"train": 0.6, "calibration": 0.4})
    if not fractions or any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-9:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    names = list(fractions)
    clusters_of: dict[str, set[str]] = defaultdict(set)
    for record in records:
        clusters_of[(record.label, record.group)].add(record.cluster)
    placed: dict[str, str] = {}
    for key in sorted(clusters_of, key=lambda k: (len(clusters_of[k]), k)):
        clusters = clusters_of[key]
        have = [sum(placed.get(c) == name for c in clusters) for name in names]
        need = [max(0, q - h) for q, h in zip(_quotas(len(clusters), list(fractions.values())), have)]
        order = sorted(range(len(names)), key=lambda i: (have[i] > 0, i))  # splits the group lacks first
        labels = [names[i] for i in order for _ in range(need[i])]
        for cluster, name in zip(sorted(clusters - placed.keys(), key=lambda c: _rank_key(c, seed)), labels):
            placed[cluster] = name
    parts: dict[str, list[GateRecord]] = {name: [] for name in names}
    for record in records:
        parts[placed[record.cluster]].append(record)
    return parts


# -- augmentation (training split only) ----------------------------------------------------
def _cut(text: str, words: int) -> str:
    """The text's first sentences up to `words` words (at least its first sentence)."""
    spans = sentence_spans(text)
    end, total = spans[0][1], 0
    for start, stop in spans:
        total += word_count(text[start:stop])
        if total > words:
            break
        end = stop
    return text[:end]


def diluted(forget_records: Sequence[GateRecord], long_records: Sequence[GateRecord], n: int, seed: int,
            min_words: int = 100, max_words: int = 2000) -> list[GateRecord]:
    """n forget records of group "diluted": a short forget text put at a random sentence boundary of a
    benign long text cut to a random length in [min_words, max_words]. Deterministic for a seed."""
    short = [r for r in forget_records if r.messages is None]
    if not short or not long_records:
        raise ValueError("diluted needs forget records with a text and long benign records")
    rng = random.Random(seed)
    made = []
    for _ in range(n):
        target, host = rng.choice(short), rng.choice(long_records)
        body = _cut(host.text, rng.randint(min_words, max_words))
        ends = [0] + [stop for _, stop in sentence_spans(body)]
        at = rng.choice(ends)
        text = (body[:at].rstrip() + " " + target.text.strip() + " " + body[at:].lstrip()).strip()
        made.append(GateRecord(text, "forget", "diluted", f"{target.cluster}+{host.cluster}", target.lang,
                               None, f"diluted(seed={seed})"))
    return made


_LEET_OF = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"}
_ZERO_WIDTH = ("\u200b", "\u200c", "\u200d", "\u2060", "\u00ad")
_WORD_TOKEN = re.compile(r"[A-Za-z]{4,}")


@lru_cache(maxsize=None)
def _homoglyph(char: str) -> str | None:
    """A Cyrillic or Greek letter that looks like `char` and that canonical() folds back to it."""
    for entry in confusables_data.get(char, ()):
        glyph = entry["c"]
        if len(glyph) == 1 and alias(glyph) in ("CYRILLIC", "GREEK") and canonical("x" + glyph) == "x" + char:
            return glyph
    return None


def _leet(word: str, rng: random.Random) -> str:
    swappable = [i for i, c in enumerate(word) if c.lower() in _LEET_OF]
    if not swappable:
        return word
    swap = set(rng.sample(swappable, rng.randint(1, len(swappable))))
    return "".join(_LEET_OF[c.lower()] if i in swap else c for i, c in enumerate(word))


def _spaced(word: str, rng: random.Random) -> str:
    return rng.choice((" ", "-", ".", "_", " . ")).join(word)


def _homoglyphs(word: str, rng: random.Random) -> str:
    """Some letters swapped for look-alikes, at least one kept Latin (a mixed-script word is what
    canonical() folds)."""
    swappable = [i for i, c in enumerate(word) if _homoglyph(c)]
    if not swappable:
        return word
    swap = set(rng.sample(swappable, rng.randint(1, min(len(swappable), len(word) - 1))))
    return "".join(_homoglyph(c) if i in swap else c for i, c in enumerate(word))


def _zero_width(word: str, rng: random.Random) -> str:
    gaps = set(rng.sample(range(1, len(word)), rng.randint(1, len(word) - 1)))
    return "".join((rng.choice(_ZERO_WIDTH) if i in gaps else "") + c for i, c in enumerate(word))


def _inner_punctuation(word: str, rng: random.Random) -> str:
    cut = rng.randint(1, len(word) - 1)
    return word[:cut] + rng.choice(".*_·~") + word[cut:]


_OBFUSCATIONS = (_leet, _spaced, _homoglyphs, _zero_width, _inner_punctuation)


def obfuscate(text: str, rng: random.Random) -> str:
    """The text with one to three of its words (capitalised ones first) disguised by one method:
    leetspeak, letter spacing, look-alike letters, zero-width characters or punctuation inside."""
    words = list(_WORD_TOKEN.finditer(text))
    if not words:
        return text
    method = rng.choice(_OBFUSCATIONS)
    named = [m for m in words if m.group()[0].isupper()] or words
    chosen = sorted(rng.sample(named, min(len(named), rng.randint(1, 3))), key=lambda m: m.start())
    return _rewritten(text, chosen, method, rng)


def _rewritten(text: str, chosen: Sequence[re.Match[str]], rewrite: Callable[[str, random.Random], str],
               rng: random.Random) -> str:
    """The text with each chosen word (in order) replaced by rewrite(word, rng)."""
    pieces, at = [], 0
    for match in chosen:
        pieces += [text[at:match.start()], rewrite(match.group(), rng)]
        at = match.end()
    return "".join(pieces) + text[at:]


_VOWELS = "aeiouy"


def _misspell(word: str, rng: random.Random) -> str:
    """One slip of the pen past the first letter: a letter dropped, doubled or swapped with its
    neighbour, a vowel for another, or the end cut off (as a nickname does)."""
    inner = range(1, len(word) - 1)
    at = rng.choice(inner)
    slip = rng.choice(("drop", "double", "swap", "vowel", "cut"))
    if slip == "drop":
        return word[:at] + word[at + 1:]
    if slip == "double":
        return word[:at] + word[at] + word[at:]
    if slip == "swap":
        return word[:at] + word[at + 1] + word[at] + word[at + 2:]
    vowels = [i for i in inner if word[i].lower() in _VOWELS]
    if slip == "vowel" and vowels:
        i = rng.choice(vowels)
        return word[:i] + rng.choice([v for v in _VOWELS if v != word[i].lower()]) + word[i + 1:]
    return word[:max(4, len(word) - rng.randint(2, 4))]


def misspell(text: str, rng: random.Random) -> str:
    """The text with one or two of its words (names first: capitalised, not opening a sentence)
    misspelt (`_misspell`): the slips no normalised reading undoes, unlike `obfuscate`'s disguises."""
    words = list(_WORD_TOKEN.finditer(text))
    if not words:
        return text
    named = [m for m in words if m.group()[0].isupper() and text[:m.start()].rstrip()[-1:] not in ("", ".", "!", "?")]
    named = named or words
    chosen = sorted(rng.sample(named, min(len(named), rng.randint(1, 2))), key=lambda m: m.start())
    return _rewritten(text, chosen, _misspell, rng)


def obfuscated(forget_records: Sequence[GateRecord], n: int, seed: int, disguise: str = "obfuscated"
               ) -> list[GateRecord]:
    """n forget records of group "obfuscated": a forget text with some of its words disguised
    (`disguise`: "obfuscated" by `obfuscate` or "misspelt" by `misspell`), so that the encoder also
    learns the spellings no reading undoes. Deterministic for a seed."""
    method = {"obfuscated": obfuscate, "misspelt": misspell}.get(disguise)
    if method is None:
        raise ValueError(f"disguise must be obfuscated or misspelt, not {disguise!r}")
    short = [r for r in forget_records if r.messages is None]
    if n and not short:
        raise ValueError("obfuscated needs forget records with a text")
    rng = random.Random(seed)
    made = []
    for _ in range(n):
        target = rng.choice(short)
        made.append(GateRecord(method(target.text, rng), "forget", "obfuscated", target.cluster, target.lang,
                               None, f"{disguise}(seed={seed})"))
    return made
