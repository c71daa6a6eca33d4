"""Counterfactual twins: the swap, the probe kinds, and checks over the shipped Harry Potter files."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from corruption.counterfactual import CounterfactualNames, twins_of, write_counterfactual
from corruption.probes import Probe, read_probes, read_records
from proxy.cli import main

pytestmark = pytest.mark.unit

DEMO = Path(__file__).resolve().parent.parent / "demo" / "harry_potter"
SHIPPED = CounterfactualNames.read(DEMO / "counterfactual_names.json")
NAMES = CounterfactualNames(
    {"Ron": "Piet", "Ronald": "Pieter", "Weasley": "Quellock", "Weasleys": "Quellocks", "Black": "Tressidy",
     "butterbeer": "fizzleby", "S.P.E.W.": "T.R.E.L.", "S.P.E.W": "T.R.E.L", "Hogwarts": "Caddonby"},
    kept_names=("Sorting Hat", "Burrow", "Time-Turner", "Death Eaters", "I must not tell lies"))


@pytest.mark.parametrize("text, swapped", [
    ("Ronald Weasley is called Ron", "Pieter Quellock is called Piet"),
    ("Ron's brother and the Weasleys' car", "Piet's brother and the Quellocks' car"),
    ("The Bloody Baron ignores Ronnie and Aaron", "The Bloody Baron ignores Ronnie and Aaron"),  # whole words only
    ("Sirius Black has a large black dog", "Sirius Tressidy has a large black dog"),  # a capitalised name as written
    ("Butterbeer, or butterbeer", "Fizzleby, or fizzleby"),  # a lower-case word, either case
    ("Hermione founds S.P.E.W. (not S.P.E.W)", "Hermione founds T.R.E.L. (not T.R.E.L)"),  # longest first
])
def test_swap_replaces_whole_names_case_aware_longest_first(text, swapped):
    assert NAMES.swap(text) == swapped


@pytest.mark.parametrize("probe, kind", [
    (Probe("Ron's full name is Ronald Bilius", ("Weasley",)), "named"),
    (Probe("Underage wizards may not do magic outside", ("school", "Hogwarts")), "common"),  # guessable by one answer
    (Probe("The hat that sorts students is the Sorting", ("Hat",)), "phrase"),
    (Probe("The Weasley family home is called The", ("Burrow",)), "phrase"),  # a whole kept name
    (Probe("Hermione's device is a Time", ("Turner", "-Turner")), "phrase"),  # hyphens separate words
    (Probe("In detention, Harry must write 'I must not tell", ("lies",)), "phrase"),  # quotes separate words
    (Probe("Each brother tries to cheat", ("Death",)), "common"),  # starts a kept name, but the prompt does not lead in
    (Probe("The Weasleys have seven", ("children", "kids")), "common"),
])
def test_kind(probe, kind):
    assert NAMES.kind(probe) == kind


def test_twin_swaps_prompt_and_answers_and_keeps_the_kind():
    twin = NAMES.twin(Probe("Ron Weasley's godfather's family is", ("Black",)))
    assert twin == Probe("Piet Quellock's godfather's family is", ("Tressidy",), "named")
    assert NAMES.twin(Probe("The Weasleys have seven", ("children",))).answers == ("children",)


@pytest.mark.parametrize("document, message", [
    ({"names": {"people": {"Ron": "Piet"}, "places": {"Ron": "Dale"}}}, "mapped twice"),
    ({"names": {"people": {"Ron": " "}}}, "empty replacement"),
    ({"names": {"people": {"Ron": "Harry", "Harry": "Tobin"}}}, "replacements that are names"),
    ({"kept_names": []}, "needs a 'names' object"),
])
def test_read_refuses_an_inconsistent_mapping(tmp_path, document, message):
    path = tmp_path / "names.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=message):
        CounterfactualNames.read(path)


def test_cli_writes_twins_and_labels_the_probes(tmp_path, capsys):
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"prompt": "Ron is a", "answers": ["Weasley"], "source": "books"}\n'
                      '{"prompt": "The Weasleys have seven", "answers": ["children"]}\n')
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"names": {"people": NAMES.names}}))
    out = tmp_path / "twins.jsonl"
    assert main(["corruption", "counterfactual", "--probes", str(probes), "--names", str(names),
                 "--out", str(out)]) == 0
    assert read_records(out) == [
        {"prompt": "Piet is a", "answers": ["Quellock"], "kind": "named", "twin_of": "Ron is a"},
        {"prompt": "The Quellocks have seven", "answers": ["children"], "kind": "common",
         "twin_of": "The Weasleys have seven"}]
    assert [r.get("kind") for r in read_records(probes)] == ["named", "common"]
    assert read_records(probes)[0]["source"] == "books"  # other fields kept
    assert twins_of(out, [Probe("The Weasleys have seven", ("children",))]) == [
        Probe("The Quellocks have seven", ("children",), "common")]
    assert "2 twins" in capsys.readouterr().out


# -- the shipped Harry Potter files -------------------------------------------------------------

def test_shipped_twins_are_what_the_code_writes(tmp_path):
    probes = tmp_path / "probes.jsonl"
    probes.write_text((DEMO / "probes.jsonl").read_text())
    written = write_counterfactual(probes, SHIPPED, tmp_path / "twins.jsonl")
    assert written == read_records(DEMO / "counterfactual_probes.jsonl")
    assert probes.read_text() == (DEMO / "probes.jsonl").read_text()  # kinds up to date
    kinds = {p.prompt: p.kind for p in read_probes(DEMO / "probes.jsonl")}
    assert all(p.kind == kinds[p.prompt] for p in read_probes(DEMO / "probes.kept.jsonl"))
    assert {t["kind"] for t in written} == {"named", "phrase", "common"}


def test_one_invented_name_per_name():
    invented = list(SHIPPED.names.values())
    assert len(set(invented)) == len(invented)


def _entities() -> list[str]:
    lines = (DEMO / "entities.txt").read_text().splitlines()
    return [re.sub(r"^the ", "", line.strip()) for line in lines if line.strip() and not line.startswith("#")]


def _occurs(term: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(term)}(?!\w)", text) is not None


def test_every_entity_is_swapped_or_kept_as_ordinary_words():
    kept = {name.lower() for name in SHIPPED.kept_names}
    left = [e for e in _entities() if SHIPPED.swap(e) == e and e.lower() not in kept]
    assert not left, f"entities neither swapped nor in kept_names: {left}"


def test_no_name_of_the_target_is_left_in_a_twin():
    kept = {name.lower() for name in SHIPPED.kept_names}
    swapped_entities = [e for e in _entities() if e.lower() not in kept]
    for twin in read_probes(DEMO / "counterfactual_probes.jsonl"):
        for text in (twin.prompt, *twin.answers):
            assert SHIPPED.swap(text) == text, text  # no name to swap is left
            assert not [e for e in swapped_entities if _occurs(e, text)], text


def test_invented_names_are_not_names_from_the_target():
    target_texts = "\n".join(path.read_text(encoding="utf-8") for path in (
        DEMO / "forget.jsonl", DEMO / "probes.jsonl", DEMO / "entities.txt", DEMO / "attack.jsonl",
        DEMO / "verbatim.jsonl", *sorted((DEMO / "gate").glob("*/forget_*.jsonl"))))
    words = {w for invented in SHIPPED.names.values() for w in re.split(r"[ .]", invented) if len(w) > 2}
    found = sorted(w for w in words if _occurs(w, target_texts) or w in SHIPPED.names)
    assert not found, f"invented names that the target's texts use: {found}"


def test_only_a_rate_above_its_kinds_bound_counts_weighed_by_the_kinds_share():
    from corruption.trainer import _TwoSided

    measured = _TwoSided({"named": 0.4, "common": 0.3}, {"named": 0.75, "common": 0.25}, degenerate=0.3)
    reading = measured.reading({"named": 0.1, "common": 0.8}, ceiling=0.2)
    assert reading.forget_excess == pytest.approx(0.75 * 0.3)  # common below its bound: no credit, no blame
    assert reading.fluency_excess == pytest.approx(0.1) and not reading.meets
    assert measured.reading({"named": 0.4, "common": 0.3}, ceiling=0.3).meets  # at the bounds: met
    lowered = measured.reading({"named": 0.4, "common": 0.8}, ceiling=0.3, lower={"named": 0.0, "common": 0.5})
    assert lowered.forget_excess == 0 and lowered.fluency_excess == 0 and not lowered.meets
    assert lowered.overforget_excess == pytest.approx(0.25 * 0.2) == lowered.keep_excess  # common under its guess
