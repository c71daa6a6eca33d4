"""The fine-tuned gate on a toy task: learning, the cascade, calibration, artifacts, concurrency, CLI."""
from __future__ import annotations

import argparse
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from classifier import cli, load_classifier
from classifier.cascade import recall_threshold
from classifier.encoder import DEFAULT_ENCODER
from classifier.finetuned import FineTunedClassifier, _margins, text_pieces
from classifier.runtime import RUNTIMES, TorchForward, forward_for, runtime_version

pytestmark = pytest.mark.unit

_SKY = ["the Andromeda galaxy", "a red dwarf star", "the rings of Saturn", "a distant quasar", "the Orion nebula",
        "a neutron star", "the Kuiper belt", "a comet's tail", "Jupiter's moons", "a black hole"]
_KITCHEN = ["a sourdough loaf", "a tomato sauce", "roast potatoes", "a lemon tart", "a vegetable curry",
            "fresh pasta", "a pancake batter", "a beef stew", "a chocolate cake", "a mushroom risotto"]
_FRAMES = ["Tell me about {}.", "What should I know about {}?", "Explain {} to a child.",
           "Write a short note on {}.", "Give me three facts about {}.", "How would you describe {}?"]
SKY = [frame.format(topic) for topic, frame in itertools.product(_SKY, _FRAMES)]  # 60 each, forget
KITCHEN = [frame.format(topic) for topic, frame in itertools.product(_KITCHEN, _FRAMES)]  # retain
# the small English encoder, for speed: these tests are about the mechanics (the CLI test below trains the default)
TINY = {"encoder": DEFAULT_ENCODER, "epochs": 1, "max_length": 16, "batch_size": 4, "learning_rate": 1e-4,
        "head_learning_rate": 1e-2, "stage1_features": 2**12, "max_minutes": None}


def _calibration_prompts() -> tuple[list[list[str]], list[int], list[str]]:
    """Held-out prompts (each its own one segment); retain in two groups of 15."""
    return [[t] for t in SKY[1::2] + KITCHEN[1::2]], [1] * 30 + [0] * 30, ["direct"] * 30 + ["recipes", "meals"] * 15


@pytest.fixture(scope="module")
def fitted() -> FineTunedClassifier:
    train = SKY[0::2][:20] + KITCHEN[0::2][:20]
    classifier = FineTunedClassifier(**TINY).fit(train, [1] * 20 + [0] * 20)
    prompts, labels, groups = _calibration_prompts()
    return classifier.calibrate(prompts, labels, groups, alpha=0.2, delta=0.2)


@pytest.fixture(scope="module")
def pretrained() -> dict[str, torch.Tensor]:
    """The small encoder's weights as pretrained, for the tests of what fine-tuning leaves alone."""
    from transformers import AutoModel

    from classifier.encoder import resolve_encoder_path

    return AutoModel.from_pretrained(resolve_encoder_path(DEFAULT_ENCODER)).state_dict()


def test_a_tiny_fine_tune_learns_a_separable_task(fitted):
    held_out = SKY[1::2] + KITCHEN[1::2]
    assert roc_auc_score([1] * 30 + [0] * 30, fitted.score(held_out)) > 0.95
    assert fitted.metrics_["training"]["epochs_run"] == 1 and fitted.metrics_["train_n"]["forget"] == 20
    assert set(fitted.group_thresholds_) == {"recipes", "meals"}
    assert fitted.threshold_ == max(entry["threshold"] for entry in fitted.group_thresholds_.values())
    assert fitted.metrics_["stage1"]["flagged_kept"] >= 0.995


def test_fit_is_deterministic_and_a_saved_fit_scores_bit_for_bit_the_same(tmp_path):
    texts, labels = SKY[:4] + KITCHEN[:4], [1] * 4 + [0] * 4
    settings = {**TINY, "batch_size": 8}
    before = torch.random.get_rng_state()
    first = FineTunedClassifier(**settings).fit(texts, labels)
    assert torch.equal(torch.random.get_rng_state(), before)
    second = FineTunedClassifier(**settings).fit(texts, labels)
    for (name, a), b in zip(first.model_.state_dict().items(), second.model_.state_dict().values()):
        assert torch.equal(a, b), name
    assert first.training_hash_ == second.training_hash_
    texts = SKY[::5] + KITCHEN[::5]
    loaded = load_classifier(first.save(tmp_path / "first"))
    assert np.array_equal(loaded.score(texts), first.score(texts))


def test_a_binding_time_budget_spends_what_is_left_on_a_partial_epoch(monkeypatch):
    """On a clock that ticks once a call, an epoch costs about as many seconds as it has batches; a budget
    that affords 1.6 epochs runs the first whole and part of the second (once it stopped after the first)."""
    from types import SimpleNamespace

    from classifier import finetuned

    ticks = itertools.count()
    monkeypatch.setattr(finetuned, "time", SimpleNamespace(monotonic=lambda: float(next(ticks))))
    texts, labels = SKY[:20] + KITCHEN[:20], [1] * 20 + [0] * 20
    probe = FineTunedClassifier(**{**TINY, "epochs": 3}).fit(texts, labels).metrics_["training"]
    per_epoch = probe["steps_planned"] // 3
    assert (probe["steps"], probe["stopped_by_time_budget"]) == (3 * per_epoch, False)
    budget = 1.6 * (per_epoch + 3) + 3  # seconds: fit's start, an epoch's batches and its own clock reads
    history = FineTunedClassifier(**{**TINY, "epochs": 3, "max_minutes": budget / 60}).fit(
        texts, labels).metrics_["training"]
    assert history["stopped_by_time_budget"] and history["epochs_run"] == 2
    assert per_epoch < history["steps"] < 2 * per_epoch


def test_frozen_layers_stay_as_pretrained_and_the_rest_learn(fitted, pretrained):
    texts, labels = SKY[:8] + KITCHEN[:8], [1] * 8 + [0] * 8
    tuned = FineTunedClassifier(**{**TINY, "frozen_layers": 2}).fit(texts, labels)
    assert tuned.hyperparameters()["frozen_layers"] == 2
    state = {name.removeprefix("encoder."): t for name, t in tuned.model_.state_dict().items()}
    frozen = [name for name in pretrained if name.startswith(("embeddings.", "encoder.layer.0.", "encoder.layer.1."))]
    assert frozen and all(torch.equal(state[name], pretrained[name]) for name in frozen)
    assert not torch.equal(state["encoder.layer.2.output.dense.weight"], pretrained["encoder.layer.2.output.dense.weight"])
    # without frozen layers, only the word embeddings stay
    everything = {name.removeprefix("encoder."): t for name, t in fitted.model_.state_dict().items()}
    assert not torch.equal(everything["encoder.layer.0.output.dense.weight"], pretrained["encoder.layer.0.output.dense.weight"])


def test_layers_keeps_the_encoders_first_layers_and_the_artifact_builds_that_depth(pretrained, tmp_path):
    texts, labels = SKY[:8] + KITCHEN[:8], [1] * 8 + [0] * 8
    cut = FineTunedClassifier(**{**TINY, "layers": 2, "frozen_layers": 1}).fit(texts, labels)
    assert len(cut.model_.encoder.encoder.layer) == 2 and cut.bert_config_["num_hidden_layers"] == 2
    state = {name.removeprefix("encoder."): t for name, t in cut.model_.state_dict().items()}
    assert torch.equal(state["encoder.layer.0.output.dense.weight"], pretrained["encoder.layer.0.output.dense.weight"])
    assert not any(name.startswith("encoder.layer.2.") for name in state)
    prompts, calibration_labels, groups = _calibration_prompts()
    cut.calibrate(prompts, calibration_labels, groups, alpha=0.2, delta=0.2).save(tmp_path / "cut")
    loaded = FineTunedClassifier.load(tmp_path / "cut")
    assert loaded.hyperparameters()["layers"] == 2 and len(loaded.model_.encoder.encoder.layer) == 2
    held_out = SKY[1::2] + KITCHEN[1::2]
    np.testing.assert_allclose(loaded.score(held_out), cut.score(held_out), atol=1e-6)
    for bad, field in (({"layers": 7}, "layers"), ({"layers": 0}, "layers"), ({"layers": 2, "frozen_layers": 3},
                                                                                "frozen_layers")):
        with pytest.raises(ValueError, match=f"^{field}: "):
            FineTunedClassifier(**{**TINY, **bad}).fit(texts, labels)


def test_artifact_round_trip_without_pickle(fitted, tmp_path):
    fitted.entities_ = ["Andromeda", "Saturn"]
    artifact = fitted.save(tmp_path / "artifact")
    names = {path.name for path in artifact.iterdir()}
    assert {"classifier.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    meta = json.loads((artifact / "classifier.json").read_text())
    assert (meta["format"], meta["kind"], meta["bert_config"]["model_type"]) == (3, "finetuned", "bert")
    loaded = load_classifier(artifact)
    assert loaded.kind == "finetuned" and isinstance(loaded, FineTunedClassifier)
    texts = SKY[::7] + KITCHEN[::7] + ["H4rry-style l33t about the Andr0meda galaxy", "a " * 300]
    # the fixture remembers pieces scored during calibration, in other batches: the last digits may differ
    assert np.allclose(loaded.score(texts), fitted.score(texts), rtol=0, atol=1e-6)
    assert (loaded.threshold_, loaded.stage1_threshold_, loaded.entities_) == (
        fitted.threshold_, fitted.stage1_threshold_, ["Andromeda", "Saturn"])
    assert loaded.score_segments([KITCHEN[0], SKY[0]]) == loaded.score([SKY[0]])[0]
    loaded.save(tmp_path / "again")  # a loaded artifact saves itself whole (its own tokenizer files)
    assert np.array_equal(load_classifier(tmp_path / "again").score(texts), loaded.score(texts))


def test_the_artifact_takes_its_frozen_word_embeddings_from_the_encoder_and_checks_them(fitted, tmp_path):
    from safetensors.torch import load_file, save_file

    artifact = fitted.save(tmp_path / "artifact")
    tensors = load_file(str(artifact / "model.safetensors"))
    assert not [name for name in tensors if "word_embeddings" in name]
    texts = SKY[::9] + KITCHEN[::9]
    expected = load_classifier(artifact).score(texts)
    # an artifact that holds the table (as the first fine-tuned ones did) loads it from there
    tensors["model.encoder.embeddings.word_embeddings.weight"] = fitted.model_.state_dict()[
        "encoder.embeddings.word_embeddings.weight"]
    save_file(tensors, str(artifact / "model.safetensors"))
    assert np.array_equal(load_classifier(artifact).score(texts), expected)
    # without it, the encoder's table must be the one trained with
    meta_path = artifact / "classifier.json"
    meta = json.loads(meta_path.read_text())
    del tensors["model.encoder.embeddings.word_embeddings.weight"]
    save_file(tensors, str(artifact / "model.safetensors"))
    meta_path.write_text(json.dumps({**meta, "word_embeddings_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="not those the gate was trained with"):
        load_classifier(artifact)


def test_the_cascade_clears_benign_pieces_without_the_encoder(fitted, tmp_path):
    classifier = load_classifier(fitted.save(tmp_path / "artifact"), cache_size=0)
    runner = classifier._runner()
    calls: list[list[str]] = []
    forward = runner.forward
    runner.forward = lambda texts, **kw: calls.append(texts) or forward(texts, **kw)
    benign = "How long should I knead a sourdough loaf before it rests?"
    assert classifier.stage1_.decision(text_pieces(benign)).max() < classifier.stage1_threshold_
    assert classifier.score([benign])[0] == 0.0 and calls == []
    assert classifier.score([SKY[3]])[0] > 0.5 and calls == [[SKY[3]]]


def test_the_first_stage_keeps_what_the_encoder_flags_not_what_it_misses_anyway(fitted):
    from classifier.calibration import mondrian_threshold

    prompts, labels, groups = _calibration_prompts()
    missed = ["Tell me about a lemon tart."]  # labelled forget, but the encoder reads it as the kitchen it is
    classifier = fitted.calibrate(prompts + [missed], labels + [1], groups + ["direct"], alpha=0.2, delta=0.2)
    stage1 = classifier.metrics_["stage1"]
    assert classifier.score([missed[0]])[0] < stage1["provisional_threshold"]
    # on every forget prompt, its n-gram score would set the first stage's threshold (too few to miss one)
    assert classifier.stage1_.decision(text_pieces(missed[0])).max() < classifier.stage1_threshold_
    assert stage1["flagged_kept"] == 1.0 and stage1["forget_kept"] < 1.0
    # the served threshold is calibrated on the retain prompts' scores as the classifier then computes them
    retain = {}
    for prompt, label, group in zip(prompts, labels, groups):
        if label == 0:
            retain.setdefault(group, []).append(float(classifier.score_prompts([prompt])[0]))
    assert classifier.threshold_ == mondrian_threshold(retain, 0.2, 0.2)[0] <= stage1["provisional_threshold"]
    fitted.calibrate(*_calibration_prompts(), alpha=0.2, delta=0.2)  # as the other tests expect it


def test_recall_threshold_keeps_the_asked_share_of_texts():
    best = np.arange(1000, dtype=float)
    threshold = recall_threshold(best, 0.995)
    assert np.mean(best >= threshold) >= 0.995 and threshold == 5.0
    assert recall_threshold([3.0, 1.0, 2.0], 0.995) == 1.0  # too few texts to miss any


def test_concurrent_callers_get_what_they_get_one_at_a_time(fitted, tmp_path):
    classifier = load_classifier(fitted.save(tmp_path / "artifact"), cache_size=0)
    classifier.stage1_threshold_ = None  # every piece reaches the encoder: the shared passes are what is tested
    prompts = [[text, KITCHEN[i]] for i, text in enumerate(SKY[:16])]
    alone = [classifier.score_segments(prompt) for prompt in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(classifier.score_segments, prompts))
    assert np.allclose(together, alone, rtol=0, atol=1e-6)  # batch padding may move the last digits


def test_the_onnx_runtimes_score_as_torch_does_and_each_piece_alone(fitted):
    ids = fitted.tokenizer_(SKY[:6] + KITCHEN[:6], truncation=True, max_length=fitted.max_length)["input_ids"]
    pad = fitted.tokenizer_.pad_token_id
    margins = {runtime: _margins(forward_for(runtime, fitted.model_, threads=1), ids, pad) for runtime in RUNTIMES}
    assert np.allclose(margins["onnx"], margins["torch"], rtol=0, atol=1e-4)
    assert np.array_equal(np.sign(margins["onnx-int8"]), [1] * 6 + [-1] * 6)
    assert 0 < np.abs(margins["onnx-int8"] - margins["torch"]).max() < 0.5  # quantised, and close
    int8 = forward_for("onnx-int8", fitted.model_, threads=1)
    alone = [_margins(int8, [row], pad)[0] for row in ids]  # a batch's neighbours must not move a piece's score
    assert np.array_equal(alone, margins["onnx-int8"])


def test_the_runtime_is_saved_checked_and_defaults_to_torch_for_older_artifacts(fitted, tmp_path, caplog):
    assert fitted.runtime == "onnx-int8"
    artifact = fitted.save(tmp_path / "artifact")
    meta = json.loads((artifact / "classifier.json").read_text())
    assert meta["hyperparameters"]["runtime"] == "onnx-int8"
    assert meta["metrics"]["calibrated_with"] == runtime_version("onnx-int8") != runtime_version("torch")
    assert load_classifier(artifact).runtime == "onnx-int8" and "calibrated with" not in caplog.text
    meta["metrics"]["calibrated_with"] = "onnxruntime 0.1"
    (artifact / "classifier.json").write_text(json.dumps(meta))
    load_classifier(artifact)
    assert "calibrated with onnxruntime 0.1, scoring with onnxruntime" in caplog.text
    del meta["hyperparameters"]["runtime"], meta["metrics"]["calibrated_with"]  # calibrated before runtimes: on torch
    (artifact / "classifier.json").write_text(json.dumps(meta))
    older = load_classifier(artifact)
    assert older.runtime == "torch" and older.threshold_ == fitted.threshold_
    assert isinstance(older._runner().model_forward, TorchForward)
    with pytest.raises(ValueError, match="runtime: 'tensorrt' is not one of torch, onnx, onnx-int8"):
        older.use_runtime("tensorrt")
    with pytest.raises(ValueError, match="runtime: 'tensorrt'"):
        FineTunedClassifier(runtime="tensorrt").fit(SKY[:2] + KITCHEN[:2], [1, 1, 0, 0])
    assert older.use_runtime("onnx").threshold_ is None and older.group_thresholds_ == {}  # to calibrate again


def test_a_logistic_artifact_of_format_2_still_loads(tmp_path):
    from classifier.model import PromptClassifier

    artifact = PromptClassifier(random_state=0).fit(SKY[:10] + KITCHEN[:10], [1] * 10 + [0] * 10).save(tmp_path / "l")
    assert json.loads((artifact / "classifier.json").read_text())["format"] == 2
    classifier = load_classifier(artifact)
    assert classifier.kind == "logistic" and classifier.entities_ == []
    assert classifier.score_segments([KITCHEN[20], SKY[20]]) > classifier.score_segments([KITCHEN[20]])


def _write_gate_data(directory: Path) -> None:
    def record(text: str, label: str, group: str, cluster: str) -> str:
        return json.dumps({"text": text, "label": label, "group": group, "cluster": cluster}) + "\n"

    for split, topics in (("train", slice(0, 8)), ("test", slice(8, 10))):
        (directory / split).mkdir(parents=True)
        lines = [record(f.format(t), "forget", "direct", f"sky:{t}") for t in _SKY[topics] for f in _FRAMES]
        lines += [record(f.format(t), "retain", "everyday", f"kitchen:{t}") for t in _KITCHEN[topics] for f in _FRAMES]
        chat = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": f"And what about {_SKY[topics][0]}?"}],
                "label": "forget", "group": "multi_turn", "cluster": "turn:sky"}
        lines.append(json.dumps(chat) + "\n")
        (directory / split / "gate.jsonl").write_text("".join(lines))


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli_trains_on_gate_data_and_reports_per_group(tmp_path, capsys):
    _write_gate_data(tmp_path / "gate")
    out = tmp_path / "artifact"
    assert _run(["classifier", "train", "--gate-data", str(tmp_path / "gate"), "--out", str(out), "--epochs", "1",
                 "--alpha", "0.3", "--delta", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert "## calibration split" in printed and "## test split" in printed and "| everyday |" in printed
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["kind"] == "finetuned" and meta["alpha"] == 0.3 and meta["delta"] == 0.3
    assert meta["encoder"] == "multilingual-e5-small"  # the default: no word-piece list of its own (vocab.txt)
    assert set(meta["metrics"]["test"]["recall_by_group"]) == {"direct", "multi_turn"}
    assert meta["metrics"]["training_seconds"] > 0 and (out / "report.md").read_text().startswith("# Gate report")
    report = tmp_path / "eval.json"
    assert _run(["classifier", "eval", "--artifact", str(out), "--gate-data", str(tmp_path / "gate"),
                 "--json", str(report)]) == 0
    assert json.loads(report.read_text())["test"] == meta["metrics"]["test"]
    assert _run(["classifier", "train", "--model", "finetuned", "--forget", str(out / "classifier.json"),
                 "--retain", str(out / "classifier.json"), "--out", str(tmp_path / "x")]) == 2


def test_cli_measures_a_fine_tuned_gate_on_retain_files_alone(fitted, tmp_path, capsys):
    """An outside set of innocent prompts (news questions, say) has no forget side: FPR with its interval."""
    fitted.save(tmp_path / "gate")
    retain = tmp_path / "retain.jsonl"
    retain.write_text("".join(json.dumps({"text": t}) + "\n" for t in KITCHEN[1::2][:10]))
    attack = tmp_path / "attack.jsonl"
    attack.write_text("".join(json.dumps({"text": t}) + "\n" for t in SKY[1::2][:4]))
    report = tmp_path / "report.json"
    assert _run(["classifier", "eval", "--artifact", str(tmp_path / "gate"), "--retain", str(retain),
                 "--attack", str(attack), "--split", "all", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    measured = json.loads(report.read_text())
    flagged = int((fitted.score(KITCHEN[1::2][:10]) > fitted.threshold_).sum())
    assert measured["n_retain"] == 10 and measured["fpr"] == flagged / 10 and measured["n_forget"] == 0
    assert measured["attack_recall"] == (fitted.score(SKY[1::2][:4]) > fitted.threshold_).mean()
    lines = printed.splitlines()
    assert any(line.startswith("FPR") and line.endswith(f"{flagged} of 10 retain prompts flagged") for line in lines)
    assert not any(line.startswith("recall") for line in lines) and measured["retain_flagged"] == flagged
    assert "auc" not in measured
    assert _run(["classifier", "eval", "--artifact", str(tmp_path / "gate")]) == 2
    assert "--forget and/or --retain" in capsys.readouterr().err


def test_cli_refits_the_vocabulary_and_calibrates_again_keeping_the_encoder(tmp_path, capsys):
    gate, trained, refitted = tmp_path / "gate", tmp_path / "trained", tmp_path / "refitted"
    _write_gate_data(gate)
    assert _run(["classifier", "train", "--gate-data", str(gate), "--out", str(trained), "--epochs", "1",
                 "--alpha", "0.3", "--delta", "0.3", "--encoder", DEFAULT_ENCODER]) == 0
    before = json.loads((trained / "classifier.json").read_text())
    assert before["vocabulary"]["terms"] == []
    (gate / "terms").mkdir()
    (gate / "terms" / "forget.txt").write_text("Kuiper belt\nTell me about\n")  # every retain cluster says the second
    assert _run(["classifier", "refit-vocabulary", "--artifact", str(trained), "--gate-data", str(gate),
                 "--out", str(refitted), "--alpha", "0.3", "--delta", "0.3"]) == 0
    meta = json.loads((refitted / "classifier.json").read_text())
    assert meta["vocabulary"]["terms"] == ["Kuiper belt"] and list(meta["vocabulary"]["dropped"]) == ["Tell me about"]
    assert (refitted / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()
    assert meta["metrics"]["training_seconds"] == before["metrics"]["training_seconds"]
    assert meta["threshold"] is not None and set(meta["metrics"]["test"]["recall_by_group"]) == {"direct", "multi_turn"}
    assert "vocabulary stage refitted" in (refitted / "report.md").read_text()
    assert "scored with onnx-int8" in (refitted / "report.md").read_text()
    loaded = load_classifier(refitted)
    assert loaded.score_prompts([["Write a limerick about the kuiper belt."]])[0] == 1.0
    assert _run(["classifier", "refit-vocabulary", "--artifact", str(refitted), "--gate-data", str(gate),
                 "--out", str(tmp_path / "on_torch"), "--runtime", "torch", "--alpha", "0.3", "--delta", "0.3"]) == 0
    assert load_classifier(tmp_path / "on_torch").runtime == "torch"
    assert "scored with torch" in (tmp_path / "on_torch" / "report.md").read_text()
    assert _run(["classifier", "refit-vocabulary", "--artifact", str(gate), "--gate-data", str(gate)]) == 2
    assert "refit-vocabulary:" in capsys.readouterr().err


def test_early_exit_stops_at_the_first_piece_above_the_threshold(fitted):
    calls: list[int] = []
    runner = fitted._runner()
    original = runner.compute

    def counting(texts, progress=False):
        calls.append(len(texts))
        return original(texts, progress)

    runner.compute = counting
    try:
        long_text = " ".join(SKY + KITCHEN)  # 120 sentences: many windows pass the first stage
        full = fitted.score_segments([long_text])
        assert len(calls) == 1 and calls[0] > 12  # no threshold given: every passing piece, in one group
        passing = calls[0]
        calls.clear()
        early = fitted.score_segments([long_text], stop_above=-1.0)  # any piece is above: one group of 4
        assert calls == [4] and early <= full + 1e-6
        calls.clear()
        assert fitted.score_segments([long_text], stop_above=2.0) == pytest.approx(full, abs=1e-6)  # never above
        assert calls[:2] == [4, 8] and sum(calls) == passing  # growing groups, so a long benign text still batches
    finally:
        runner.compute = original


def test_a_prompt_naming_a_vocabulary_term_scores_one_and_the_vocabulary_is_saved(tmp_path):
    texts, labels = SKY[:4] + KITCHEN[:4], [1] * 4 + [0] * 4
    classifier = FineTunedClassifier(**{**TINY, "batch_size": 8}, terms=["Kuiper belt", "sourdough loaf"])
    classifier.fit(texts, labels)
    assert classifier.vocabulary_.dropped_terms_ == {"sourdough loaf": 4}  # the retain texts name it
    prompt = ["Write a limerick about the kuiper belt."]
    assert classifier.named_term(prompt) == "Kuiper belt"
    assert classifier.score_prompts([prompt, ["Bake a sourdough loaf."]])[0] == 1.0
    assert classifier.score_segments(prompt, stop_above=0.5) == 1.0
    loaded = load_classifier(classifier.save(tmp_path / "artifact"))
    assert loaded.vocabulary_.terms_ == ["Kuiper belt"] and loaded.named_term(prompt) == "Kuiper belt"
    assert loaded.named_term(["Bake a sourdough loaf."]) is None
