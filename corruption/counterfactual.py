"""Counterfactual twins of knowledge probes: what a model that never read the target answers.

A twin is its forget probe with every name the target coined swapped for an invented one, by one
mapping for the whole target (a hand-written JSON file), so "Ron Weasley" is the same invented
person in every twin. The uncorrupted model's answer rate on the twins, per probe kind, is the level
the corrupted forget probes should come down to: not 0, since some probes can be guessed without
the target.

Kinds, decided on the forget probe and copied to its twin so the two sides line up:
- "named": every answer is a name of the target; the twin's answer is invented, so only a guess
  that happens to invent the same word gets it;
- "phrase": an answer is an ordinary word finishing a name of the target made of ordinary words
  ("...the Sorting" -> "Hat"); those words are kept on both sides, so the twin is as guessable as
  the probe, and a model that knows the phrase still knows it in the twin (a lenient reference);
- "common": any other answer is an ordinary word or a real-world name ("The Weasleys have
  seven" -> "children"), kept in the twin and guessable there.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar

from corruption.probes import Probe, read_probes, read_records

Kind = Literal["named", "phrase", "common"]
KINDS: tuple[Kind, ...] = ("named", "phrase", "common")
Value = TypeVar("Value")


def _words(text: str) -> list[str]:
    """Lower-cased words: spaces, hyphens and quotes separate them, an apostrophe inside a word does not."""
    return re.findall(r"\w+(?:'\w+)*", text.lower())


@dataclass(frozen=True)
class CounterfactualNames:
    """The target's names and their invented replacements, and the target's names made of ordinary words."""

    names: dict[str, str]
    kept_names: tuple[str, ...] = ()

    @classmethod
    def read(cls, path: str | Path) -> CounterfactualNames:
        """The JSON file: {"names": {section: {name: invented}}, "kept_names": [...]}. ValueError on a name
        mapped twice, an empty replacement or a replacement that is itself a name to swap."""
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(document, dict) or not isinstance(document.get("names"), dict):
            raise ValueError(f"{path}: needs a 'names' object of sections")
        names: dict[str, str] = {}
        for section in document["names"].values():
            for name, invented in section.items():
                if name in names:
                    raise ValueError(f"{path}: {name!r} is mapped twice")
                if not invented.strip():
                    raise ValueError(f"{path}: {name!r} has an empty replacement")
                names[name] = invented
        looped = set(names.values()) & set(names)
        if looped:
            raise ValueError(f"{path}: replacements that are names to swap: {sorted(looped)}")
        return cls(names, tuple(document.get("kept_names", ())))

    @cached_property
    def _forms(self) -> dict[str, str]:
        """Each written form to its replacement: a capitalised name only as written, a lower-case one
        capitalised too (its replacement then capitalised)."""
        forms: dict[str, str] = {}
        for name, invented in self.names.items():
            forms[name] = invented
            if name[0].islower():
                forms[name[0].upper() + name[1:]] = invented[0].upper() + invented[1:]
        return forms

    @cached_property
    def _pattern(self) -> re.Pattern[str]:
        # longest first, so "S.P.E.W." wins over "S.P.E.W" and a plural over its singular
        alternatives = "|".join(re.escape(f) for f in sorted(self._forms, key=len, reverse=True))
        return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")

    def swap(self, text: str) -> str:
        """The text with every name replaced, in one pass (a replacement is never swapped again)."""
        return self._pattern.sub(lambda match: self._forms[match.group(0)], text)

    def kind(self, probe: Probe) -> Kind:
        if all(self.swap(answer) != answer for answer in probe.answers):
            return "named"
        if any(self._finishes_kept_name(probe.prompt, answer) for answer in probe.answers):
            return "phrase"
        return "common"

    def _finishes_kept_name(self, prompt: str, answer: str) -> bool:
        """The answer is a whole kept name, or the words after the start of one that the prompt ends with."""
        said, answered = _words(prompt), _words(answer)
        if not answered:
            return False
        for name in map(_words, self.kept_names):
            for start in range(len(name) - len(answered) + 1):
                if name[start:start + len(answered)] != answered:
                    continue
                whole = start == 0 and len(answered) == len(name)
                led_in = start > 0 and said[-start:] == name[:start]
                if whole or led_in:
                    return True
        return False

    def twin(self, probe: Probe) -> Probe:
        """The counterfactual twin, carrying the kind of `probe`."""
        return Probe(self.swap(probe.prompt), tuple(self.swap(a) for a in probe.answers), self.kind(probe))


def write_counterfactual(probes_path: Path, names: CounterfactualNames, out: Path) -> list[dict[str, Any]]:
    """Writes the twin of every probe in `probes_path` to `out` (JSONL: prompt, answers, kind, twin_of) and
    rewrites `probes_path` with each probe's kind; returns the twins' records."""
    records = read_records(probes_path)
    twins = []
    for record, probe in zip(records, read_probes(probes_path), strict=True):
        twin = names.twin(probe)
        record["kind"] = twin.kind
        twins.append({"prompt": twin.prompt, "answers": list(twin.answers), "kind": twin.kind,
                      "twin_of": probe.prompt})
    _write_jsonl(probes_path, records)
    _write_jsonl(out, twins)
    return twins


def by_kind(probes: Sequence[Probe], values: Sequence[Value]) -> dict[str, list[Value]]:
    """Each probe's value under its kind ("unsorted" for a probe without one), kinds in sorted order."""
    grouped: dict[str, list[Value]] = {}
    for probe, value in zip(probes, values, strict=True):
        grouped.setdefault(probe.kind or "unsorted", []).append(value)
    return dict(sorted(grouped.items()))


def twins_of(counterfactual_path: Path, probes: Sequence[Probe]) -> list[Probe]:
    """The twins (from a file `write_counterfactual` wrote) of the given forget probes, in file order."""
    prompts = {p.prompt for p in probes}
    return [twin for twin, record in zip(read_probes(counterfactual_path), read_records(counterfactual_path),
                                         strict=True) if record.get("twin_of") in prompts]


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
