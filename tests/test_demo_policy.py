"""The shipped demo policy (demo/policy.yaml: the Harry Potter gate and its learned corruption) through
the real proxy and vLLM: the README's headline claims, checked on a handful of probes. Requests go one at
a time, so no batch changes a greedy answer."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from proxy_harness import start_proxy

from classifier.data import split_of
from corruption.probes import read_probes

pytestmark = pytest.mark.backend

DEMO = Path(__file__).resolve().parent.parent / "demo"
# Prompts near the target that an earlier gate corrupted (issue 11): names the books share, things they borrow
NEIGHBOURS = [
    "The barn owl hunts mice at",
    "A potter's kiln reaches temperatures of",
    "My neighbour Mrs Potter grows prize roses in her",
    "Basketball's Washington Wizards play their home games in",
    "In Python, to open a file for reading you call",
    "The Roman god Mercury carried a",
]


@pytest.fixture(scope="module")
def demo_proxy(backend, tmp_path_factory):
    process = start_proxy(DEMO / "policy.yaml", backend.url, backend.model_dir, backend.served_model_name,
                          tmp_path_factory.mktemp("demo-proxy"))
    yield process
    process.stop()


def _complete(url: str, prompt: str) -> httpx.Response:
    response = httpx.post(f"{url}/v1/completions", json={"model": "gemma-3-270m", "prompt": prompt, "max_tokens": 8,
                                                          "temperature": 0}, timeout=120)
    assert response.status_code == 200, response.text
    return response


def test_flagged_held_out_named_facts_are_forgotten(demo_proxy, backend):
    """Probes whose answer is a name from the books, held out from the corruption's training, that the model
    answers without the proxy: those the gate flags are (almost) never answered through it, as a model that
    never read the books would not know an invented name (the counterfactual reference: 1 of 14 held-out
    twins). The gate misses some of these sentence fragments (the README's 4 of 14): they are not counted."""
    probes = [p for p in read_probes(DEMO / "harry_potter" / "probes.kept.jsonl")
              if p.kind == "named" and split_of(p.prompt) != "train"]
    assert len(probes) == 14
    raw = [p.answered_by(_complete(backend.url, p.prompt).json()["choices"][0]["text"]) for p in probes]
    assert sum(raw) >= 13
    through = [(p, _complete(demo_proxy.url, p.prompt)) for p in probes]
    flagged = [(p, r) for p, r in through if r.headers["x-eco-flagged"] == "true"]
    assert len(flagged) >= 9  # the README's 10 of 14, one of slack
    answered = [p.prompt for p, r in flagged if p.answered_by(r.json()["choices"][0]["text"])]
    assert len(answered) <= 2, (len(flagged), answered)


def test_neighbours_reach_the_model_untouched(demo_proxy, backend):
    for prompt in NEIGHBOURS:
        through = _complete(demo_proxy.url, prompt)
        assert through.headers["x-eco-flagged"] == "false", prompt
        direct = _complete(backend.url, prompt).json()
        assert through.json()["choices"] == direct["choices"], prompt
