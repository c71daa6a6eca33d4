"""The evaluation harness's metrics and aggregation, on small fixtures (no endpoints)."""
from __future__ import annotations

import json
import math

import pytest

from corruption.probes import Probe
from evaluation.client import Reply
from evaluation.harness import PROBABILITY_ROUTES, TargetData, attacked, evaluate, load_target
from evaluation.metrics import answer_rate, degenerate_share, identity_rate, refusal_rate
from evaluation.report import markdown, plots

pytestmark = pytest.mark.unit


def test_rates_with_intervals():
    probes = [Probe("a", ("Paris",)), Probe("b", ("Tokyo", "Edo"))]
    result = answer_rate(probes, [" Paris, of course", " edo"])
    assert result["rate"] == 1.0 and result["n"] == 2 and result["ci"][1] == 1.0
    assert identity_rate(["x", "y"], ["x", "z"])["rate"] == 0.5
    with pytest.raises(ValueError):
        answer_rate(probes, ["only one"])


def test_refusals_and_degenerate_outputs_are_counted():
    refusals = ["I'm sorry, but I can't help with that.", "I don't know who that is.", "I cannot say.",
                "Sorry, I am unable to discuss that."]
    answers = ["Hermione Granger, of course.", "I know a cat named Tom.", "They cannot agree on a name."]
    assert refusal_rate(refusals)["successes"] == 4 and refusal_rate(answers)["successes"] == 0
    looping = "the owl the owl the owl the owl"
    assert degenerate_share(["", looping, "A fine answer with words."]) | {"ci": None} == {
        "rate": 2 / 3, "n": 3, "successes": 2, "ci": None}


class ScriptedEndpoint:
    """Answers from a table: the harness's aggregation is what is under test, not an endpoint."""

    def __init__(self, base_url: str, knows: set[str], flags: set[str] = frozenset(), model: str = "m"):
        self.base_url, self.knows, self.flags, self.model = base_url, knows, flags, model

    def _reply(self, prompt: str) -> Reply:
        known = [answer for key, answer in ANSWERS.items() if prompt.endswith(key) and key in self.knows]
        flagged = None if self.base_url == "raw" else any(word in prompt for word in self.flags)
        return Reply(f" {known[0]} and so on" if known else " something else", flagged, None)

    def complete(self, prompts, max_tokens, desc, one_at_a_time=False, logprobs=None):
        replies = [self._reply(p) for p in prompts]
        if logprobs is None:
            return replies
        # the first word written, at probability 0.9 (its answer token by token, as the word tokenizer spells it)
        return [Reply(r.text, r.flagged, r.target,
                      {"tokens": [r.text.split()[0]], "top_logprobs": [{r.text.split()[0]: math.log(0.9)}]})
                for r in replies]

    def chat(self, conversations, max_tokens, desc, continue_final_message=False, logprobs=None):
        return self.complete([c[-1]["content"] for c in conversations], max_tokens, desc, logprobs=logprobs)


ANSWERS = {"owl is named": "Hedwig", "headmaster is Albus": "Dumbledore", "capital of Japan is": "Tokyo",
           "Frodo carries the One": "Ring", "Threnmoor was Edwin": "Callow"}
TARGET = TargetData(
    name="hp",
    forget_probes=[Probe("Harry's owl is named", ("Hedwig",), "named"),
                   Probe("The headmaster is Albus", ("Dumbledore",), "named")],
    forget_prompts=["Who is Harry?", "Tell me about Hogwarts"],
    control_probes=[Probe("The founder of Threnmoor was Edwin", ("Callow",))],
    # twins: the scripted model knows neither invented name; a "common" twin without a forget probe of its kind
    counterfactual_probes=[Probe("Tobin's owl is named", ("Ysolde",), "named"),
                           Probe("The headmaster is Ewart", ("Thistlewaite",), "named"),
                           Probe("The capital of Japan is", ("Tokyo",), "common")],
    retain_probes=[Probe("The capital of Japan is", ("Tokyo",)), Probe("Frodo carries the One", ("Ring",))],
    retain_prompts={"retain_general": ["What is the capital of Japan?", "How do owls sleep?"]},
    attack=[[{"role": "user", "content": "Hogwartz?"}]],
    verbatim=[("Harry's owl is named", "Hedwig and so on")],
)


def test_evaluate_aggregates_systems_gate_and_goals(tmp_path):
    everything = {"owl is named", "headmaster is Albus", "capital of Japan is", "Frodo carries the One"}
    raw = ScriptedEndpoint("raw", everything)
    guarded = ScriptedEndpoint("guarded", {"capital of Japan is", "Frodo carries the One"},
                               flags={"Harry", "Hogwarts", "headmaster"})
    report = evaluate(raw, guarded, TARGET, "Harry Potter")
    systems = report["systems"]
    assert systems["raw"]["forget_answer_rate"]["rate"] == 1.0
    assert systems["guarded"]["forget_answer_rate"]["rate"] == 0.0
    assert systems["guarded"]["retain_identical_to_raw"]["rate"] == 1.0
    # the system prompt is prepended, so the scripted model (matching on the ending) still answers
    assert systems["system_prompt"]["forget_answer_rate"]["rate"] == 1.0
    assert systems["refusal"]["forget_answer_rate"]["rate"] == 0.0
    assert systems["raw"]["forget_answer_rate_chat"]["rate"] == 1.0
    assert systems["guarded"]["forget_answer_rate_chat"]["rate"] == 0.0
    assert systems["refusal"]["forget_refusal_rate_chat"]["rate"] == 1.0  # the canned refusal is a tell ...
    assert systems["guarded"]["forget_refusal_rate_chat"]["rate"] == 0.0  # ... a corrupted answer is not
    assert systems["raw"]["continuation_degenerate_rate"]["n"] == 1
    assert report["gate"]["forget"]["rate"] == 1.0 and report["gate"]["retain_general"]["rate"] == 0.0
    assert report["gate"]["attack"]["rate"] == 0.0  # "Hogwartz" slips through this scripted gate
    assert report["control_answer_rate"]["rate"] == 0.0
    for route in ("completion", "chat"):
        assert report["counterfactual_answer_rate_by_kind"][route]["named"]["rate"] == 0.0
        assert report["counterfactual_answer_rate_by_kind"][route]["common"]["rate"] == 1.0
    assert systems["raw"]["forget_answer_rate_by_kind"]["named"]["rate"] == 1.0
    assert systems["guarded"]["forget_answer_rate_by_kind"]["named"]["successes"] == 0
    assert report["goals"] == {"forget_at_or_below_control": True, "retain_equal_to_raw": True,
                               "forget_within_counterfactual": {"completion": {"named": True}, "chat": {"named": True}}}
    table = markdown(report)
    assert "| ECO proxy" in table and "Goals: forget answer rate at or below control: **yes**" in table
    named_row = "| named | 0.0% [0–66] (n=2) | 100.0% [34–100] (n=2) | 0.0% [0–66] (n=2) | 0.0% [0–66] (n=2) |"
    assert table.count(named_row) == 2
    assert "| common | 100.0% [21–100] (n=1) | – | – | – |" in table
    assert "on chats within the counterfactual reference's interval: named **yes**" in table
    assert all(p.stat().st_size > 0 for p in plots(report, tmp_path))


class _WordTokenizer:
    """One token per word, each shown without its leading space (as the scripted replies' logprobs are)."""

    def __init__(self):
        self.words: list[str] = []

    def __call__(self, text, add_special_tokens):
        self.words += [word for word in text.split() if word not in self.words]
        return {"input_ids": [self.words.index(word) for word in text.split()]}

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


def test_with_the_tokenizer_the_report_gives_the_answers_probability_per_kind():
    everything = {"owl is named", "headmaster is Albus", "capital of Japan is", "Frodo carries the One"}
    guarded = ScriptedEndpoint("guarded", {"owl is named"}, flags={"Harry", "headmaster"})
    report = evaluate(ScriptedEndpoint("raw", everything), guarded, TARGET, "Harry Potter", tokenizer=_WordTokenizer())
    raw_named = report["systems"]["raw"]["forget_answer_probability_by_kind"]["named"]
    eco_named = report["systems"]["guarded"]["forget_answer_probability_by_kind"]["named"]
    assert raw_named["rate"] == pytest.approx(0.9) and raw_named["n"] == 2
    assert eco_named["rate"] == pytest.approx(0.45)  # the owl probe still answered, the headmaster not
    for route, key in PROBABILITY_ROUTES.items():  # the scripted chat answers as the completion does
        assert report["systems"]["guarded"][key]["named"]["rate"] == pytest.approx(0.45)
        reference = report["counterfactual_answer_probability_by_kind"][route]
        assert reference["named"]["rate"] == 0.0 and reference["common"]["rate"] == pytest.approx(0.9)
    table = markdown(report)
    assert table.count("| named | 0.0% [0–66] (n=2) | 90.0% [") == 2 and table.count("| common | 90.0% [") == 2
    assert "answer on chats, per probe kind" in table
    assert "forget_answer_probability_by_kind" not in evaluate(
        ScriptedEndpoint("raw", everything), guarded, TARGET, "Harry Potter")["systems"]["raw"]


def test_attacks_give_the_answer_rate_of_the_flagged_prompts_beside_the_flag_rate():
    everything = {"owl is named", "headmaster is Albus", "capital of Japan is", "Frodo carries the One"}
    # this guarded endpoint flags "Harry" but its corruption fails: the flagged probe is still answered
    report = evaluate(ScriptedEndpoint("raw", everything), ScriptedEndpoint("guarded", everything, flags={"Harry"}),
                      TARGET, "Harry Potter")
    for attack in ("framed", "diluted"):  # the probe's ending, which the scripted model answers, is kept
        entry = report["attacks"][attack]
        assert entry["raw"]["rate"] == 1.0 and entry["guarded"]["rate"] == 1.0
        assert entry["flagged"]["successes"] == 1 and entry["refusal"]["rate"] == 0.5
        assert (entry["guarded_when_flagged"]["successes"], entry["guarded_when_flagged"]["n"]) == (1, 1)
    probes = [p.prompt for p in TARGET.forget_probes]
    assert attacked(probes) == attacked(probes)  # the same disguises every run
    assert all(a != p for a, p in zip(attacked(probes)["obfuscated"], probes))
    assert all(a.endswith(p) and len(a.split()) > len(p.split()) + 80 for a, p in zip(attacked(probes)["diluted"], probes))
    assert "| framed | 100.0% [34–100] (n=2) | 50.0% [9–91] (n=2) | 100.0% [34–100] (n=2) | 50.0% [9–91] (n=2) " \
           "| 100.0% [21–100] (n=1) |" in markdown(report)


def test_refusal_baseline_costs_retain_when_the_gate_misfires():
    raw = ScriptedEndpoint("raw", {"capital of Japan is", "Frodo carries the One"})
    guarded = ScriptedEndpoint("guarded", {"capital of Japan is", "Frodo carries the One"}, flags={"Frodo"})
    report = evaluate(raw, guarded, TARGET, "Harry Potter")
    assert report["systems"]["refusal"]["retain_answer_rate"]["rate"] == 0.5
    assert report["systems"]["guarded"]["retain_answer_rate"]["rate"] == 1.0


def test_load_target_leaves_out_the_probes_trained_on(tmp_path):
    from classifier.data import split_of

    prompts = [f"Fact number {i} is" for i in range(40)]
    (tmp_path / "probes.jsonl").write_text("".join(json.dumps({"prompt": p, "answers": ["x"]}) + "\n" for p in prompts))
    (tmp_path / "forget.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    (tmp_path / "retain_probes.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "answers": ["b"], "source": f"s{i}"}) + "\n" for i, p in enumerate(prompts)))
    target = load_target(tmp_path, "t", [])
    assert [p.prompt for p in target.forget_probes] == [p for p in prompts if split_of(p) != "train"]
    assert target.forget_prompts == [p for p in prompts if split_of(p) == "test"]
    held_out = [i for i, p in enumerate(prompts) if split_of(p) != "train"]
    assert [p.prompt for p in target.retain_probes] == [prompts[i] for i in held_out]
    assert target.retain_sources == [f"s{i}" for i in held_out]
    assert target.attack == [] and target.verbatim == []
    (tmp_path / "probes.kept.jsonl").write_text(json.dumps({"prompt": "kept", "answers": ["x"]}) + "\n")
    kept = [p.prompt for p in load_target(tmp_path, "t", []).forget_probes]
    assert kept == [p for p in ["kept"] if split_of(p) != "train"]  # the filtered file wins when present
    (tmp_path / "verbatim.jsonl").write_text(json.dumps({"prefix": "Harry's owl is", "reference": "Hedwig."}) + "\n")
    assert load_target(tmp_path, "t", []).verbatim == [("Harry's owl is", "Hedwig.")]


def test_answer_rate_by_kind_groups_probes_and_keeps_unsorted_ones():
    from evaluation.metrics import answer_rate_by_kind

    probes = [Probe("a", ("x",), "named"), Probe("b", ("y",), "named"), Probe("c", ("z",), "common"), Probe("d", ("w",))]
    rates = answer_rate_by_kind(probes, ["x", "no", "z", "w"])
    assert {kind: (r["successes"], r["n"]) for kind, r in rates.items()} == {
        "common": (1, 1), "named": (1, 2), "unsorted": (1, 1)}
    assert rates["named"]["ci"][0] < 0.5 < rates["named"]["ci"][1]
