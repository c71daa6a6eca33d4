"""The prompt classifier on synthetic data: separation, calibrated FPR, artifacts, windows, CLI."""
from __future__ import annotations

import argparse
import itertools
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from classifier import cli
from classifier.data import ENTITY_FRAMES, entity_prompts, read_jsonl, read_terms, split, split_of
from classifier.encoder import Encoder
from classifier.entities import distinctive_terms
from stats.intervals import wilson_interval
from classifier.model import HEAD_FILE, PromptClassifier
from classifier.report import evaluate_texts

pytestmark = pytest.mark.unit

_ASTRONOMY = ["the Andromeda galaxy", "a red dwarf star", "the rings of Saturn", "a distant quasar", "the Orion nebula",
              "a neutron star", "the Kuiper belt", "a comet's tail", "Jupiter's moons", "a black hole"]
_COOKING = ["a sourdough loaf", "a tomato sauce", "roast potatoes", "a lemon tart", "a vegetable curry",
            "fresh pasta", "a pancake batter", "a beef stew", "a chocolate cake", "a mushroom risotto"]
_FRAMES = ["Tell me about {}.", "What should I know about {}?", "Explain {} to a child.", "Write a short note on {}.",
           "I keep reading about {}; why does it matter?", "Give me three facts about {}.",
           "How would you describe {}?", "Is {} interesting?", "Summarise what is known about {}.",
           "Why do people talk about {}?"]


def _sentences(topics: list[str]) -> list[str]:
    return [frame.format(topic) for topic, frame in itertools.product(topics, _FRAMES)]


ASTRONOMY, COOKING = _sentences(_ASTRONOMY), _sentences(_COOKING)  # 100 each


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder()


@pytest.fixture(scope="module")
def fitted(encoder) -> PromptClassifier:
    train = [t for t in ASTRONOMY + COOKING if split_of(t) == "train"]
    labels = [int(t in ASTRONOMY) for t in train]
    return PromptClassifier(encoder, random_state=0).fit(train, labels)


def test_encodings_equal_sentence_transformers_own(encoder):
    texts = [COOKING[0], ASTRONOMY[5] * 40, "x"]  # the long one is truncated at the model's window, as there
    reference = encoder.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert np.allclose(encoder.forward(texts), reference, atol=1e-6)


def test_concurrent_callers_share_forward_passes_and_get_their_own_rows():
    encoder = Encoder(cache_size=0)
    expected = {text: encoder.encode([text])[0] for text in ASTRONOMY[:12]}
    forwards = []
    original = encoder.forward
    encoder.forward = lambda texts, **kw: forwards.append(len(texts)) or original(texts, **kw)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda t: encoder.encode([t, "a shared sentence"]), ASTRONOMY[:12]))
    for text, rows in zip(ASTRONOMY[:12], results):
        assert rows.shape == (2, encoder.dimension)
        assert np.allclose(rows[0], expected[text], atol=1e-5)  # batch padding may move the last digits
    assert sum(forwards) < 24 and len(forwards) < 12  # some calls rode along with another's forward pass


def test_no_backlog_of_passes_builds_up_on_the_shared_thread():
    """Other work given to the same thread (the proxy's corruption) waits for at most one pass, not a queue of them."""

    class CountingExecutor(ThreadPoolExecutor):
        waiting, most_waiting = 0, 0

        def submit(self, fn, *args, **kwargs):
            def run():
                CountingExecutor.waiting -= 1
                return fn(*args, **kwargs)
            CountingExecutor.waiting += 1
            CountingExecutor.most_waiting = max(CountingExecutor.most_waiting, CountingExecutor.waiting)
            return super().submit(run)

    encoder = Encoder(cache_size=0, executor=CountingExecutor(1))
    slow = encoder.forward
    encoder.forward = lambda texts, **kw: time.sleep(0.02) or slow(texts, **kw)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda t: encoder.encode([t]), ASTRONOMY[:64]))
    assert CountingExecutor.most_waiting <= 2  # the pass being handed over, and the one next in line


def test_cache_returns_the_remembered_rows_and_stays_bounded():
    encoder = Encoder(cache_size=3)
    first = encoder.encode(COOKING[:3])
    encoder.forward = None  # a cache hit must not run the model
    assert np.array_equal(encoder.encode(COOKING[2::-1]), first[::-1])
    encoder.forward = lambda texts, **kw: np.zeros((len(texts), encoder.dimension))
    encoder.encode(COOKING[3:4])
    assert list(encoder._cache) == [COOKING[1], COOKING[0], COOKING[3]]  # COOKING[2], used least recently, left


def test_a_failed_forward_pass_reaches_every_waiting_caller():
    encoder = Encoder(cache_size=0)

    def broken(texts, **kw):
        raise RuntimeError("encoder down")

    encoder.forward = broken
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(encoder.encode, [text]) for text in COOKING[:8]]
    for future in futures:
        with pytest.raises(RuntimeError, match="encoder down"):
            future.result()


def test_separable_data_gives_high_auc(fitted):
    held_out = [t for t in ASTRONOMY + COOKING if split_of(t) != "train"]
    labels = [int(t in ASTRONOMY) for t in held_out]
    assert roc_auc_score(labels, fitted.score(held_out)) > 0.95
    proba = fitted.predict_proba(held_out[:3])
    assert proba.shape == (3, 2) and np.allclose(proba.sum(axis=1), 1)


def test_calibrated_threshold_keeps_fpr_within_alpha_on_held_out_retain(encoder):
    # retain: varied general prompts; forget: astronomy. Calibrate on one half of retain, test on the other.
    retain = [f"{frame.format(topic)} ({n})" for n, (topic, frame) in enumerate(
        itertools.product(_COOKING + ["a bicycle", "a violin", "the tax form", "my garden", "a job interview",
                                      "a chess opening", "the football match", "a train timetable"], _FRAMES))]
    calibration, test = retain[0::2], retain[1::2]
    classifier = PromptClassifier(encoder).fit(ASTRONOMY[:60] + COOKING[:30], [1] * 60 + [0] * 30)
    classifier.calibrate(calibration, alpha=0.1)
    fpr = float(classifier.predict(test).mean())
    assert fpr <= 0.1 + 0.05  # exchangeable halves: FPR <= alpha up to sampling error
    assert classifier.metrics_["calibration_n"] == len(calibration)
    report = evaluate_texts(classifier, ASTRONOMY[60:], test)
    assert report["fpr"] == pytest.approx(fpr) and report["recall"] > 0.9
    assert report["fpr_ci"][0] <= report["fpr"] <= report["fpr_ci"][1]


def test_too_few_calibration_prompts_flag_nothing_and_warn(fitted, encoder, tmp_path):
    clone = PromptClassifier.load(fitted.save(tmp_path / "copy"), encoder=encoder)  # the fixture stays as it is
    with pytest.warns(UserWarning, match="too few"):
        clone.calibrate(COOKING[:5], alpha=0.05)
    assert clone.threshold_ == 1.0


def test_artifact_round_trip_without_pickle(fitted, encoder, tmp_path):
    fitted.calibrate(COOKING[:40], alpha=0.05)
    fitted.entities_ = ["Andromeda", "Saturn"]
    fitted.save(tmp_path / "artifact")
    assert sorted(p.name for p in (tmp_path / "artifact").iterdir()) == ["classifier.json", "head.safetensors"]
    assert PromptClassifier.artifact_encoder_spec(tmp_path / "artifact") == "all-MiniLM-L6-v2"
    loaded = PromptClassifier.load(tmp_path / "artifact", encoder=encoder)
    assert np.array_equal(loaded.score(ASTRONOMY[:5]), fitted.score(ASTRONOMY[:5]))
    assert (loaded.threshold_, loaded.alpha_, loaded.entities_) == (fitted.threshold_, 0.05, ["Andromeda", "Saturn"])
    assert loaded.training_hash_ == fitted.training_hash_


def test_embedding_only_classifier_round_trips(encoder, tmp_path):
    train = [t for t in ASTRONOMY + COOKING if split_of(t) == "train"]
    plain = PromptClassifier(encoder, ngram_features=0).fit(train, [int(t in ASTRONOMY) for t in train])
    loaded = PromptClassifier.load(plain.save(tmp_path / "plain"), encoder=encoder)
    assert loaded.ngram_coef_.size == 0
    assert np.array_equal(loaded.score(ASTRONOMY[:5]), plain.score(ASTRONOMY[:5]))


def test_load_rejects_a_corrupt_artifact(fitted, tmp_path):
    from safetensors.numpy import save_file

    artifact = fitted.save(tmp_path / "artifact")
    save_file({"coef": np.zeros(7, dtype=np.float32), "intercept": np.zeros(1, dtype=np.float32)},
              str(artifact / HEAD_FILE))
    with pytest.raises(ValueError, match="expected coef"):
        PromptClassifier.load(artifact)
    (artifact / HEAD_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read"):
        PromptClassifier.load(artifact)
    (artifact / "classifier.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        PromptClassifier.load(artifact)


def test_a_long_prompt_is_covered_whole(fitted, encoder):
    target = "Tell me about the Andromeda galaxy and the Orion nebula."
    filler = " ".join(["I would like a recipe for a vegetable curry with rice."] * 150)  # ~1,800 tokens
    long_prompt = filler + " " + target
    assert len(encoder.windows(long_prompt)) > 5
    truncated_score = fitted.score([encoder.tokenizer.decode(
        encoder.tokenizer(long_prompt, add_special_tokens=False, verbose=False)["input_ids"][:encoder.max_tokens])])
    assert fitted.score([long_prompt])[0] > 0.5 > truncated_score[0]
    assert fitted.score_segments([filler, target]) == pytest.approx(fitted.score([target])[0])


def test_windows_cover_every_token(encoder):
    text = " ".join(f"word{i}" for i in range(900))
    windows = encoder.windows(text)
    joined = " ".join(windows).replace(" ", "")
    assert all(f"word{i}" in joined for i in range(900))


def test_fit_is_deterministic(encoder):
    texts, labels = ASTRONOMY[:20] + COOKING[:20], [1] * 20 + [0] * 20
    a = PromptClassifier(encoder).fit(texts, labels)
    b = PromptClassifier(encoder).fit(list(reversed(texts)), list(reversed(labels)))
    assert np.allclose(a.coef_, b.coef_, atol=1e-5) and a.training_hash_ == b.training_hash_
    with pytest.raises(ValueError, match="both classes"):
        PromptClassifier(encoder).fit(texts[:3], [1, 1, 1])


def test_wilson_interval_always_holds_the_rate():
    for n in range(1, 200):
        for successes in (0, n // 2, n):
            lo, hi = wilson_interval(successes, n)
            assert 0.0 <= lo <= successes / n <= hi <= 1.0


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-3), pytest.approx(0.7634, abs=1e-3))


def test_distinctive_terms_find_the_target_names():
    forget = ["Who taught at Hogwarts with Dumbledore?", "Was Dumbledore the headmaster of Hogwarts?",
              "Where did Hermione Granger study?", "Hermione Granger and Dumbledore met at Hogwarts.",
              "Did Hermione Granger like Dumbledore?", "Is Hogwarts a school?"]
    retain = ["Who taught at Roke with Ged?", "Was Gandalf the wisest wizard?", "Where did Frodo study?",
              "Did Gandalf like Frodo?", "What is a school?", "Is Roke a school?"]
    terms = distinctive_terms(forget, retain, top_k=5)
    assert {"Hogwarts", "Dumbledore", "Hermione Granger"} <= set(terms)
    assert "Who" not in terms and "Is" not in terms


def test_names_become_prompts_in_every_frame(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("# a comment\nHermione Granger\n\n  Hogwarts  \n")
    assert read_terms(path) == ["Hermione Granger", "Hogwarts"]
    prompts = entity_prompts(read_terms(path))
    assert len(prompts) == 2 * len(ENTITY_FRAMES) and "Tell me about Hogwarts." in prompts
    assert all(("Hermione Granger" in p) != ("Hogwarts" in p) for p in prompts)


def test_split_is_deterministic_and_explicit_split_wins(tmp_path):
    texts = [f"prompt number {i}" for i in range(300)]
    assert [split_of(t) for t in texts] == [split_of(t) for t in texts]
    shares = {name: sum(split_of(t) == name for t in texts) / 300 for name in ("train", "calibration", "test")}
    assert 0.5 < shares["train"] < 0.7 and 0.12 < shares["test"] < 0.28
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "a", "split": "test"}) + "\n\n" +
                    json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "you"}]}) + "\n")
    records = read_jsonl(path)
    assert split(records)["test"][0]["text"] == "a" and records[1]["text"] == "hi\nyou"
    path.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2"):
        read_jsonl(path)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli_train_and_eval_end_to_end(tmp_path, capsys):
    forget, retain, attack = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl", tmp_path / "attack.jsonl"
    forget.write_text("".join(json.dumps({"text": t}) + "\n" for t in ASTRONOMY))
    retain.write_text("".join(json.dumps({"text": t}) + "\n" for t in COOKING))
    attack.write_text(json.dumps({"messages": [{"role": "user", "content": "the big ringed planet?"}]}) + "\n")
    names = tmp_path / "names.txt"
    names.write_text("# planets\nSaturn\n\nNeptune\n")
    out = tmp_path / "artifact"
    assert _run(["classifier", "train", "--forget", str(forget), "--retain", str(retain), "--out", str(out),
                 "--alpha", "0.1", "--forget-entities", str(names)]) == 0
    printed = capsys.readouterr().out
    assert "test FPR" in printed and "test recall" in printed and f"(+ {2 * len(ENTITY_FRAMES)} from names" in printed
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["alpha"] == 0.1 and meta["metrics"]["test"]["auc"] > 0.95 and meta["entities"]
    assert meta["metrics"]["train_n"]["forget"] == sum(split_of(t) == "train" for t in ASTRONOMY) + 20
    report = tmp_path / "report.json"
    assert _run(["classifier", "eval", "--artifact", str(out), "--forget", str(forget), "--retain", str(retain),
                 "--attack", str(attack), "--json", str(report)]) == 0
    assert json.loads(report.read_text())["attack_n"] == 1
    assert _run(["classifier", "eval", "--artifact", str(tmp_path / "missing"), "--forget", str(forget),
                 "--retain", str(retain)]) == 2
    assert "eco-proxy classifier eval:" in capsys.readouterr().err
