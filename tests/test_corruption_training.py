"""A small corruption training run through the real backend, and the trainer's CLI."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from corruption.embeddings import EmbeddingTable
from corruption.probes import Probe
from corruption.spec import CorruptionSpec
from corruption.trainer import CorruptionTrainer, EmbedsBackend
from corruption.zo import ZerothOrderOptimizer
from proxy.cli import main

pytestmark = pytest.mark.backend

PROBES = [  # facts gemma-3-270m completes correctly when uncorrupted
    Probe("Harry Potter's best friends are Ron Weasley and", ("Hermione",)),
    Probe("The headmaster of Hogwarts is Albus", ("Dumbledore",)),
    Probe("The dark wizard who killed Harry's parents is Lord", ("Voldemort",)),
]


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
