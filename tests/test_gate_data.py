"""The gate data format: validation, the split by cluster, and training augmentations."""
from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest

from classifier.gate_data import (GateRecord, chat_transcript, diluted, load_records, misspell, obfuscate, obfuscated,
                                  split_by_cluster)
from classifier.normalize import variants
from classifier.segments import word_count

pytestmark = pytest.mark.unit

CHAT = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Let's talk about Hogwarts."},
        {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "Describe its four houses."}]


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_load_records_reads_texts_and_chats(tmp_path):
    _write(tmp_path / "a.jsonl", [
        {"text": "Who is Harry Potter?", "label": "forget", "group": "direct", "cluster": "Harry Potter"},
        {"messages": CHAT, "label": "forget", "group": "multi_turn", "cluster": "chat:houses", "kind": "x"}])
    _write(tmp_path / "b.jsonl", [
        {"text": "Wer ist Sirius?", "label": "retain", "group": "namesakes", "cluster": "star:sirius", "lang": "de"}])
    (tmp_path / "ignored.txt").write_text("not data")
    direct, chat, star = load_records(tmp_path)
    assert direct == GateRecord("Who is Harry Potter?", "forget", "direct", "Harry Potter", source="a.jsonl:1")
    assert chat.messages == tuple(CHAT) and chat.text == chat_transcript(CHAT)
    assert chat.text.splitlines()[1] == "user: Let's talk about Hogwarts."
    assert star.lang == "de" and star.source == "b.jsonl:1"


@pytest.mark.parametrize("row, reason", [
    ({"label": "forget", "group": "direct", "cluster": "c"}, "exactly one of"),
    ({"text": "x", "label": "maybe", "group": "direct", "cluster": "c"}, '"label"'),
    ({"text": "x", "label": "retain", "group": "direct", "cluster": "c"}, '"group" of a retain'),
    ({"text": "x", "label": "forget", "group": "direct", "cluster": ""}, '"cluster"'),
    ({"text": "x", "label": "forget", "group": "direct", "cluster": "c", "lang": "German"}, '"lang"'),
    ({"messages": CHAT[:3], "label": "forget", "group": "multi_turn", "cluster": "c"}, "end with a user turn"),
    ({"messages": [{"role": "bot", "content": "x"}], "label": "forget", "group": "multi_turn", "cluster": "c"},
     "message 1"),
])
def test_an_invalid_record_is_named_by_file_and_line(tmp_path, row, reason):
    good = {"text": "Who is Harry Potter?", "label": "forget", "group": "direct", "cluster": "Harry Potter"}
    _write(tmp_path / "data.jsonl", [good, row])
    with pytest.raises(ValueError, match=f"data.jsonl:2: .*{reason}"):
        load_records(tmp_path)


def _records() -> list[GateRecord]:
    rows = []
    for label, groups in (("forget", ("direct", "indirect", "framed")), ("retain", ("namesakes", "everyday"))):
        for g, group in enumerate(groups):
            for c in range(2 + 7 * g):
                for v in range(3):
                    rows.append(GateRecord(f"{group} {c} {v}", label, group, f"{group}:{c}"))
    rows.append(GateRecord("shared", "forget", "framed", "direct:0"))  # one cluster in two groups
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_cluster_straddles_two_splits_and_every_group_is_in_each(seed):
    records = _records()
    parts = split_by_cluster(records, seed=seed)
    assert sum(len(p) for p in parts.values()) == len(records)
    where = defaultdict(set)
    for name, part in parts.items():
        for record in part:
            where[record.cluster].add(name)
    assert all(len(splits) == 1 for splits in where.values())
    for group in {r.group for r in records}:
        assert all(any(r.group == group for r in part) for part in parts.values()), group
    assert split_by_cluster(records, seed=seed) == parts  # stable
    three = split_by_cluster(records, {"train": 0.6, "calibration": 0.2, "test": 0.2}, seed=seed)
    assert all(any(r.group == "framed" for r in part) for part in three.values())


def test_split_fractions_are_checked():
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_cluster(_records(), {"train": 0.6, "calibration": 0.6})


def test_diluted_buries_a_forget_text_in_a_long_benign_one():
    forget = [GateRecord("Who taught Potions at Hogwarts?", "forget", "direct", "Hogwarts")]
    sentence = "The harbour ferry leaves at dawn and returns before the evening market opens. "
    host = [GateRecord(sentence * 200, "retain", "long_documents", "long:ferry")]
    made = diluted(forget, host, n=20, seed=3, min_words=100, max_words=1000)
    assert made == diluted(forget, host, n=20, seed=3, min_words=100, max_words=1000)
    for record in made:
        assert record.label == "forget" and record.group == "diluted" and record.cluster == "Hogwarts+long:ferry"
        assert "Who taught Potions at Hogwarts?" in record.text
        assert 100 - 14 <= word_count(record.text) - 5 <= 1000
    assert len({r.text for r in made}) > 10


def test_obfuscations_are_undone_by_the_variants():
    rng = random.Random(0)
    text = "Tell me about Hermione Granger and the Hogwarts library."
    disguised = [obfuscate(text, rng) for _ in range(200)]
    assert len(set(disguised)) > 100 and text not in disguised
    recovered = sum(any(v.casefold() == text.casefold() for v in variants(d)) for d in disguised)
    assert recovered / len(disguised) > 0.8


def test_obfuscated_copies_are_forget_records_of_their_source_cluster_and_skip_chats():
    source = [GateRecord("Who taught Potions at Hogwarts?", "forget", "direct", "direct:potions"),
              GateRecord("user: hi\nuser: and Dumbledore?", "forget", "multi_turn", "mt:x",
                         messages=({"role": "user", "content": "hi"}, {"role": "user", "content": "and Dumbledore?"}))]
    made = obfuscated(source, 30, seed=1)
    assert len(made) == 30 and made == obfuscated(source, 30, seed=1)
    assert {(r.label, r.group, r.cluster, r.messages) for r in made} == {("forget", "obfuscated", "direct:potions", None)}
    assert all(r.text != source[0].text for r in made)
    assert obfuscated([], 0, seed=1) == []


def test_misspelt_copies_slip_on_names_in_ways_no_reading_undoes():
    rng = random.Random(0)
    text = "What does Dumbledore keep in his office?"
    slipped = [misspell(text, rng) for _ in range(100)]
    assert len(set(slipped)) > 30
    for copy in slipped:
        assert copy.startswith("What does D") and copy.endswith(" keep in his office?")
        assert all(v.casefold() != text.casefold() for v in variants(copy))
    source = [GateRecord(text, "forget", "direct", "direct:office")]
    made = obfuscated(source, 20, seed=2, disguise="misspelt")
    assert made == obfuscated(source, 20, seed=2, disguise="misspelt")
    assert {(r.group, r.cluster, r.source) for r in made} == {("obfuscated", "direct:office", "misspelt(seed=2)")}
    with pytest.raises(ValueError, match="misspelt"):
        obfuscated(source, 1, seed=2, disguise="typos")


@pytest.mark.parametrize("field", ["diluted_fraction", "obfuscated_fraction", "misspelt_fraction"])
def test_a_negative_augmentation_fraction_is_refused_naming_its_option(tmp_path, field):
    from classifier.training import GateTraining

    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} must be a fraction of 0 or more, not -0.1"):
        GateTraining(tmp_path, tmp_path / "out", **{field: -0.1})
    assert GateTraining(tmp_path, tmp_path / "out", **{field: 0.0}).misspelt_fraction == 0.0


def test_the_target_vocabulary_joins_the_training_split_only(tmp_path):
    from classifier.training import TERM_FRAMES_PER_TERM, gate_splits

    for split in ("train", "test"):
        (tmp_path / split).mkdir()
    lines = [{"text": f"question {i} about topic {i}", "label": "forget" if i % 2 else "retain",
              "group": "direct" if i % 2 else "everyday", "cluster": f"c{i}"} for i in range(20)]
    (tmp_path / "train" / "a.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "test" / "b.jsonl").write_text(json.dumps({**lines[0], "cluster": "t0"}) + "\n")
    (tmp_path / "terms").mkdir()
    (tmp_path / "terms" / "forget.txt").write_text("# names\nWhomping Willow\nFelix Felicis\n")
    (tmp_path / "terms" / "retain.txt").write_text("Willow Smith\n")
    splits = gate_splits(tmp_path, seed=0, diluted_fraction=0.0)
    terms = [r for r in splits["train"] if r.cluster.startswith("term:")]
    assert len(terms) == 3 * TERM_FRAMES_PER_TERM
    assert {r.label for r in terms if "Willow Smith" in r.text} == {"retain"}
    assert not any(r.cluster.startswith("term:") for name in ("calibration", "test") for r in splits[name])
    assert gate_splits(tmp_path, seed=0, diluted_fraction=0.0)["train"] == splits["train"]  # deterministic


def test_a_text_or_cluster_of_the_test_split_is_kept_out_of_training_and_calibration(tmp_path):
    from classifier.training import gate_splits

    for split in ("train", "test"):
        (tmp_path / split).mkdir()
    lines = [{"text": f"question {i} about topic {i}", "label": "forget" if i % 2 else "retain",
              "group": "direct" if i % 2 else "everyday", "cluster": f"c{i}"} for i in range(20)]
    _write(tmp_path / "train" / "a.jsonl", lines)
    _write(tmp_path / "test" / "b.jsonl", [{**lines[0], "text": "Question 0 -- about  TOPIC 0?", "cluster": "t0"},
                                           {**lines[1], "text": "another text", "cluster": "c1"}])
    splits = gate_splits(tmp_path, seed=0, diluted_fraction=0.0)
    fitted = [r.text for name in ("train", "calibration") for r in splits[name]]
    assert "question 0 about topic 0" not in fitted  # the same words, cased and punctuated otherwise
    assert "question 1 about topic 1" not in fitted  # the same cluster
    assert "question 2 about topic 2" in fitted


def test_the_shipped_gate_never_trains_on_a_held_out_probe():
    """The evaluation's held-out probes (knowledge and retain) measure the gate as well as the corruption."""
    from pathlib import Path

    from classifier.data import split_of
    from classifier.gate_data import same_text_key
    from corruption.probes import read_probes

    demo = Path(__file__).resolve().parent.parent / "demo" / "harry_potter"
    trained = {same_text_key(r.text) for r in load_records(demo / "gate" / "train")}
    held_out = [p.prompt for name in ("probes.jsonl", "retain_probes.jsonl") for p in read_probes(demo / name)
                if split_of(p.prompt) != "train"]
    assert len(held_out) > 40
    assert not [p for p in held_out if same_text_key(p) in trained]


def test_the_report_gives_the_fpr_of_retain_prompts_written_in_a_named_language():
    import numpy as np

    from classifier.report import markdown, split_report

    def retain(text, lang):
        return GateRecord(text, "retain", "namesakes", f"c:{text}", lang)

    records = [retain("Sirius", None), retain("Сириус", "ru"), retain("Сирiус", "ru"), retain("シリウス", "ja"),
               GateRecord("Wer ist Harry Potter?", "forget", "multilingual", "hp", "de")]
    report = split_report(records, np.array([0.9, 0.9, 0.1, 0.1, 0.9]), threshold=0.5)
    assert {lang: (e["hits"], e["n"]) for lang, e in report["fpr_by_language"].items()} == {"ru": (1, 2), "ja": (0, 1)}
    assert (report["fpr_languages"]["hits"], report["fpr_languages"]["n"]) == (1, 3)  # the English one is not counted
    assert (report["fpr"]["hits"], report["fpr"]["n"]) == (2, 4)
    assert "| language (retain prompts with one) | n | FPR | 95% CI |" in markdown({"test": report})
