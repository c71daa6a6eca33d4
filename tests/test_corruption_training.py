"""A small corruption training run through the real backend, and the trainer's CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from corruption.counterfactual import twins_of
from corruption.embeddings import EmbeddingTable
from corruption.probes import MultipleChoice, Probe, read_multiple_choice
from corruption.spec import CorruptionSpec
from corruption.trainer import CorruptionTrainer, EmbedsBackend, _mc_pick, mean_upper_bound
from corruption.zo import SPSASearch, ZerothOrderOptimizer
from evaluation.metrics import answer_rate_by_kind
from proxy.cli import main

pytestmark = pytest.mark.backend

PROBES = [  # facts gemma-3-270m completes correctly when uncorrupted
    Probe("Harry Potter's best friends are Ron Weasley and", ("Hermione",)),
    Probe("The headmaster of Hogwarts is Albus", ("Dumbledore",)),
    Probe("The dark wizard who killed Harry's parents is Lord", ("Voldemort",)),
]
DEMO = Path(__file__).resolve().parent.parent / "demo" / "harry_potter"
TWINNED = ["Harry Potter's best friends are Ron Weasley and Hermione", "The headmaster of Hogwarts is Albus",
           "Harry's Patronus takes the form of a", "The Weasleys have seven"]  # forget probes, in file order


@pytest.fixture(scope="module")
def trainer(backend):
    return CorruptionTrainer(
        EmbedsBackend(backend.url), AutoTokenizer.from_pretrained(backend.model_dir),
        EmbeddingTable.from_model_dir(backend.model_dir),
        CorruptionSpec(method="gaussian_first_n", dims=640, sigma=0.05), samples=2)


def test_learned_sigma_lowers_the_probe_hit_rate(trainer):
    assert trainer.probe_hit_rate(PROBES, None) == 1.0  # the model knows these uncorrupted
    assert trainer.probe_hit_rate(PROBES, 0.05) > 0  # a tiny sigma leaves the knowledge in
    result = trainer.train("probes", PROBES, 0.0, ZerothOrderOptimizer(max_steps=5), 0.05, log=lambda _: None)
    learned = result["spec"]["sigma"]
    assert learned > 0.05 and result["final_score"] < result["uncorrupted_score"]
    assert trainer.probe_hit_rate(PROBES, learned) == result["final_score"]  # deterministic noise
    assert [row["step"] for row in result["trace"]] == list(range(1, len(result["trace"]) + 1))
    assert result["final_score"] == min(row["score"] for row in result["trace"])


def test_cli_writes_a_result_a_policy_can_load(backend, tmp_path):
    probes, control = tmp_path / "probes.jsonl", tmp_path / "control.jsonl"
    probes.write_text("".join(json.dumps({"prompt": p.prompt, "answers": list(p.answers)}) + "\n" for p in PROBES))
    control.write_text(json.dumps({"prompt": "The founder of the village of Threnmoor was Edwin",
                                   "answers": ["Callowmere"]}) + "\n")
    out = tmp_path / "corruption.json"
    code = main(["corruption", "train", "--backend-url", backend.url, "--model-dir", str(backend.model_dir),
                 "--probes", str(probes), "--control", str(control), "--out", str(out),
                 "--initial", "0.05", "--steps", "4", "--samples", "1"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["goal"] == 0.0 and result["trace"] and "fluency" in result
    assert CorruptionSpec.from_result_file(out).sigma == result["spec"]["sigma"]
    assert main(["corruption", "train", "--backend-url", backend.url, "--model-dir", str(backend.model_dir),
                 "--out", str(out)]) == 2  # no probes: a one-line error, not a traceback


def test_counterfactual_reference_per_kind(trainer):
    """The uncorrupted model on a handful of shipped twins: invented answers are not guessed, and the answers per
    kind are the per-probe hits they are made of."""
    twins = twins_of(DEMO / "counterfactual_probes.jsonl", [Probe(p, ("-",)) for p in TWINNED])
    assert [t.kind for t in twins] == ["named", "named", "common", "common"]
    reference = trainer.answers_by_kind(twins)
    assert reference["named"] == [False, False]  # "Bramblett", "Thistlewaite"
    assert reference["common"] == [bool(h) for h in trainer.probe_hits(twins, None)[2:]]  # one batch, as above
    rates = answer_rate_by_kind(twins, [text for [text] in trainer.generate([t.prompt for t in twins], None, 8)])
    assert {kind: [r["successes"], r["n"]] for kind, r in rates.items()} == {
        kind: [sum(hits), len(hits)] for kind, hits in reference.items()}
    assert rates["named"]["ci"][1] > 0  # the interval of 0/2 still allows a guess


def test_mc_pick_is_the_argmax_over_the_letters_even_when_corruption_hides_them(trainer):
    questions = read_multiple_choice(DEMO / "mc.jsonl")[:6]
    backend, n = trainer.backend, 4
    assert all(len(q.choices) == n for q in questions)
    free = backend.complete([e for [e] in trainer._embeds([q.prompt() for q in questions], None)], 1, logprobs=20)
    constrained = trainer.mc_picks(questions, None)
    compared = 0
    for question, choice, [pick] in zip(questions, free, constrained):
        shown = {token.strip() for token in choice["logprobs"]["top_logprobs"][0]}
        if set(MultipleChoice.LETTERS[:n]) <= shown:  # every letter among the free top 20: same pick
            assert pick == _mc_pick(choice, n)
            compared += 1
    assert compared >= 3
    # at a large strength the free top 20 holds no letter, and the constrained request still picks one
    corrupted = [e for draws in trainer._embeds([q.prompt() for q in questions], 3.0) for e in draws]
    free = backend.complete(corrupted, 1, logprobs=20)
    lost = [i for i, c in enumerate(free)
            if not {t.strip() for t in c["logprobs"]["top_logprobs"][0]} & set(MultipleChoice.LETTERS[:n])]
    assert lost, "no corrupted prompt lost every letter from its top 20"
    picks = [p for draws in trainer.mc_picks(questions, 3.0) for p in draws]
    assert all(0 <= picks[i] < n for i in lost)


def test_two_sided_search_runs_through_the_backend(backend):
    """Three evaluations through the live vLLM: sigma 2.0 forgets the named probes (the twins' reference is 0 of
    2), so the search meets the goal at once and bisects twice towards less noise."""
    named = [Probe(p.prompt, p.answers, "named") for p in PROBES]
    trainer = CorruptionTrainer(
        EmbedsBackend(backend.url), AutoTokenizer.from_pretrained(backend.model_dir),
        EmbeddingTable.from_model_dir(backend.model_dir),
        CorruptionSpec(method="gaussian_first_n", dims=640, sigma=2.0), samples=1)
    result = trainer.search(named, {"named": (0, 2)}, ["sigma"], SPSASearch(max_steps=2, bisections=2),
                            fluency_bound=1.0, fluency_prompts=2, fluency_tokens=8, spread_keys=2, log=lambda _: None)
    assert result["uncorrupted"]["rates_by_kind"] == {"named": 1.0}
    assert result["met"] and [row["phase"] for row in result["trace"]] == ["start", "bisection", "bisection"]
    assert result["final"]["rates_by_kind"]["named"] <= result["goal"]["forget_upper_by_kind"]["named"]
    assert 0 < result["learned"]["sigma"] <= 2.0 and result["spec"]["sigma"] == result["learned"]["sigma"]
    assert len(result["spread"]["rates_by_kind"]["named"]) == 2


def test_the_search_holds_the_answer_probability_to_the_twins_when_asked(backend):
    """The uncorrupted model gives the answers of facts it knows a high probability as the next token and the
    twins' invented answers next to none; a search held to that reference reads the probability at every point,
    and a point whose probability lies above the bound does not meet the goal."""
    named = [Probe(p.prompt, p.answers, "named") for p in PROBES]
    twins = [t for t in twins_of(DEMO / "counterfactual_probes.jsonl", [Probe(p, ("-",)) for p in TWINNED])
             if t.kind == "named"]
    trainer = CorruptionTrainer(
        EmbedsBackend(backend.url), AutoTokenizer.from_pretrained(backend.model_dir),
        EmbeddingTable.from_model_dir(backend.model_dir),
        CorruptionSpec(method="gaussian_first_n", dims=640, sigma=2.0), samples=1)
    known = trainer.answer_probabilities_by_kind(named)["named"]
    invented = trainer.answer_probabilities_by_kind(twins)["named"]
    assert min(known) > 0.2 and max(invented) < 0.05, (known, invented)
    result = trainer.search(named, {"named": (0, 2)}, ["sigma"], SPSASearch(max_steps=1, bisections=2),
                            fluency_bound=1.0, fluency_prompts=2, fluency_tokens=8, spread_keys=1,
                            probability_reference={"named": invented}, log=lambda _: None)
    bound = result["goal"]["answer_probability_upper_by_kind"]["named"]
    assert bound == mean_upper_bound(invented)
    assert result["uncorrupted"]["answer_probability_by_kind"]["named"] == pytest.approx(np.mean(known), abs=0.03)
    for row in result["trace"]:
        probability = row["answer_probability_by_kind"]["named"]
        assert 0 <= probability <= 1
        assert not (probability > bound and row["meets"])
    assert len(result["spread"]["answer_probability_by_kind"]["named"]) == 1


def test_the_trainer_chooses_where_the_noise_goes_among_candidates(backend, tmp_path):
    """Two candidates, one search each through the live vLLM (sigma from 2.0 on all 640 dimensions, from the same
    noise energy on 64), then a fluency check of each on the passages given: the result is one of them, and lists
    both. Without candidates, the search runs once on the method and dimensions given."""
    probes, twins = tmp_path / "probes.jsonl", tmp_path / "twins.jsonl"
    probes.write_text("".join(json.dumps({"prompt": p.prompt, "answers": list(p.answers), "kind": "named"}) + "\n"
                              for p in PROBES))
    twins.write_text("".join(json.dumps({"prompt": f"Tobin Fenwright's friend number {i} is", "answers": ["Odelia"],
                                         "kind": "named", "twin_of": p.prompt}) + "\n" for i, p in enumerate(PROBES)))
    passages = tmp_path / "passages.jsonl"
    passages.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in (
        "Harry and Ron followed Hagrid past the Whomping Willow toward the",
        "In the Gryffindor common room Hermione showed Neville and Ginny the")))
    out = tmp_path / "corruption.json"
    code = main(["corruption", "train", "--backend-url", backend.url, "--model-dir", str(backend.model_dir),
                 "--probes", str(probes), "--counterfactual", str(twins), "--out", str(out), "--initial", "2.0",
                 "--steps", "1", "--bisections", "1", "--spread-keys", "1", "--fluency-probes", "2",
                 "--fluency-tokens", "8", "--fluency-bound", "1.0", "--samples", "1",
                 "--candidates", "gaussian_first_n", "gaussian_top_k:64", "--fluency-check-prompts", str(passages)])
    assert code == 0
    result = json.loads(out.read_text())
    searched = [(c["method"], c["dims"]) for c in result["candidates"]]
    assert searched == [("gaussian_first_n", 640), ("gaussian_top_k", 64)]
    checks = [c["fluency_check"] for c in result["candidates"]]
    assert all(c["prompts"] == 2 and 0 <= c["degenerate_rate"] <= 1 for c in checks)
    chosen = (result["spec"]["method"], result["spec"]["dims"])
    assert chosen in searched
    assert CorruptionSpec.from_result_file(out).method == chosen[0]
    one = tmp_path / "one.json"  # without candidates: the one search, as given
    assert main(["corruption", "train", "--backend-url", backend.url, "--model-dir", str(backend.model_dir),
                 "--probes", str(probes), "--counterfactual", str(twins), "--out", str(one), "--initial", "2.0",
                 "--steps", "1", "--bisections", "1", "--spread-keys", "1", "--fluency-probes", "2",
                 "--fluency-tokens", "8", "--fluency-bound", "1.0", "--samples", "1", "--method", "gaussian_top_k",
                 "--dims", "64"]) == 0
    result = json.loads(one.read_text())
    assert "candidates" not in result and (result["spec"]["method"], result["spec"]["dims"]) == ("gaussian_top_k", 64)


def test_a_chat_probe_is_the_token_sequence_the_proxy_sends_for_that_chat(backend):
    """The trainer's chat route asks vLLM exactly what the proxy would for the chat `eco-proxy eval` sends:
    one <bos>, the template's turns, the model's turn open on the probe."""
    from corruption.probes import as_chats, probe_chat

    tokenizer = AutoTokenizer.from_pretrained(backend.model_dir)
    trainer = CorruptionTrainer(EmbedsBackend(backend.url), tokenizer, EmbeddingTable.from_model_dir(backend.model_dir),
                                CorruptionSpec(method="gaussian_first_n", dims=640, sigma=0.5))
    [chat] = as_chats([Probe(PROBES[1].prompt, PROBES[1].answers, "named")], tokenizer)
    rendered = tokenizer.apply_chat_template(probe_chat(PROBES[1].prompt), continue_final_message=True, tokenize=False)
    served = tokenizer(rendered, add_special_tokens=False)["input_ids"]  # as proxy/prompts.py tokenizes a chat
    assert trainer._encode(chat.prompt, trainer.spec).token_ids == served
    assert served.count(tokenizer.bos_token_id) == 1 and chat.kind == "chat:named"
