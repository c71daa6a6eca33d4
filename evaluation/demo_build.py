"""Rebuild the shipped demo artifacts from the data in demo/, against a real backend.

1. write the counterfactual twins of a target's probes where it has a names mapping
   (counterfactual_names.json -> counterfactual_probes.jsonl, and each probe's kind), then keep the
   knowledge probes the base model answers right (probes.kept.jsonl, retain_probes.kept.jsonl);
2. train and calibrate each target's classifier (demo/<target>/classifier/): Harry Potter's is the
   fine-tuned gate on demo/harry_potter/gate (train/ split by cluster, test/ the frozen test split),
   with the logistic baseline beside it (demo/harry_potter/classifier-logistic/) for comparison;
3. learn each target's corruption strength on the train split of its kept probes
   (demo/<target>/corruption.json): where it has twins, the noise on the names the twins swap, towards
   the twins' answer rate per kind, on the dimensions the trainer chooses; else on every token, towards
   the control probes' rate; the other probes stay held out for `eco-proxy eval`.

Every step calls a Python API (`classifier.training`, `corruption.training`), never the command line.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from classifier.data import split_of
from classifier.training import FileTraining, GateTraining, train_gate, train_logistic_files
from corruption.counterfactual import CounterfactualNames, write_counterfactual
from corruption.probes import read_probes, read_records
from corruption.training import CorruptionTraining, train_corruption
from evaluation.client import Endpoint

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
PROBE_TOKENS = 8


def keep_known_probes(endpoint: Endpoint, source: Path, destination: Path) -> tuple[int, int]:
    """Write the probes whose greedy completion through `endpoint` contains an answer."""
    records = read_records(source)
    probes = read_probes(source)
    replies = endpoint.complete([p.prompt for p in probes], PROBE_TOKENS, f"probing {source.name}")
    kept = [r for r, p, reply in zip(records, probes, replies) if p.answered_by(reply.text)]
    destination.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    return len(kept), len(records)


def train_split_probes(kept: Path, workdir: Path) -> Path:
    """The probes of the "train" split (a hash of the prompt), written to a file in `workdir`: the corruption
    trains on these, and the evaluation holds out the rest."""
    records = [r for r in read_records(kept) if split_of(r["prompt"]) == "train"]
    path = workdir / f"{kept.parent.name}-train-probes.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def corruption_job(backend_url: str, model_dir: Path, target: Path, probes: Path) -> CorruptionTraining:
    """A target with counterfactual twins learns the noise on the very names its twins swap (their tokens only:
    the rest of the prompt, <bos> and the template stay as they are, as in a twin) by the two-sided search, once
    for each place the noise may go (every dimension, the 64 largest, or one at a large strength, as the paper
    does for WMDP), and keeps the most fluent; the probes are asked as completions and as chats, each route held
    to its twins' reference, by the answer rate and by the probability of continuing with the answer. One
    without learns one strength on every token towards its control probes' rate."""
    names = target / "counterfactual_names.json"
    if names.exists():
        return CorruptionTraining(backend_url, model_dir, target / "corruption.json", probes=probes,
                                  counterfactual=target / "counterfactual_probes.jsonl", scope="entities",
                                  entities=names, initial=2.0, steps=8, bisections=5, samples=2,
                                  routes=("completion", "chat"), probability_goal=True,
                                  candidates=(("gaussian_first_n", None), ("gaussian_top_k", 64),
                                              ("gaussian_first_n", 1)))
    return CorruptionTraining(backend_url, model_dir, target / "corruption.json", probes=probes,
                              control=DEMO_DIR / "harry_potter" / "control_probes.jsonl", initial=0.1, steps=12,
                              samples=3, corrupt_special_tokens=True)


def build(backend_url: str, model_dir: Path, demo_dir: Path = DEMO_DIR) -> int:
    hp, sw = demo_dir / "harry_potter", demo_dir / "star_wars"
    endpoint = Endpoint(backend_url)
    for target in (hp, sw):
        if (target / "counterfactual_names.json").exists():
            twins = write_counterfactual(target / "probes.jsonl", CounterfactualNames.read(
                target / "counterfactual_names.json"), target / "counterfactual_probes.jsonl")
            print(f"{target.name}/counterfactual_probes.jsonl: {len(twins)} twins")
    for source, destination in ((hp / "probes.jsonl", hp / "probes.kept.jsonl"),
                                (hp / "retain_probes.jsonl", hp / "retain_probes.kept.jsonl"),
                                (sw / "probes.jsonl", sw / "probes.kept.jsonl")):
        kept, total = keep_known_probes(endpoint, source, destination)
        print(f"{destination.relative_to(demo_dir)}: the model answers {kept} of {total} probes")

    # the shipped gate: multilingual-e5-small, 2 epochs planned (the 20-minute budget affords about 1.7 here)
    train_gate(GateTraining(hp / "gate", hp / "classifier", epochs=2, alpha=0.01, delta=0.1))
    train_gate(GateTraining(hp / "gate", hp / "classifier-logistic", model="logistic", alpha=0.01, delta=0.1))
    # Harry Potter prompts are negatives for the second target: the two must not overlap
    train_logistic_files(FileTraining((sw / "forget.jsonl",), (sw / "retain.jsonl", hp / "retain_general.jsonl",
                                                                hp / "forget.jsonl"), sw / "classifier", alpha=0.05))
    with tempfile.TemporaryDirectory() as workdir:
        for target in (hp, sw):
            train_corruption(corruption_job(backend_url, model_dir, target,
                                            train_split_probes(target / "probes.kept.jsonl", Path(workdir))))
    return 0
