"""Which terms a target's entity-scoped corruption uses: the policy's, else the corruption's own (what a
trainer learned its strength on), else the classifier artifact's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from corruption.spec import CorruptionSpec
from corruption.training import read_entity_terms
from proxy.policy import PolicyError, load_policy

pytestmark = pytest.mark.unit

ARTIFACT = Path(__file__).resolve().parent.parent / "demo" / "harry_potter" / "classifier-logistic"


def _policy(tmp_path: Path, spec: dict, entities: list[str] | None = None) -> Path:
    (tmp_path / "corruption.json").write_text(json.dumps({"format": "eco-corruption-result/1", "spec": spec}))
    target = {"name": "hp", "classifier": str(ARTIFACT), "threshold": 0.5, "corruption_file": "corruption.json"}
    if entities is not None:
        target["entities"] = entities
    (tmp_path / "policy.yaml").write_text(json.dumps({"version": "v", "targets": [target]}))  # JSON is YAML
    return tmp_path / "policy.yaml"


def test_entity_terms_come_from_the_policy_then_the_corruption_then_the_artifact(tmp_path):
    learned = {"method": "gaussian_first_n", "dims": 640, "sigma": 1.0, "scope": "entities",
               "entities": ["Hermione", "Hogwarts"]}
    [target] = load_policy(_policy(tmp_path, learned)).targets
    assert target.entities == ("Hermione", "Hogwarts")
    [target] = load_policy(_policy(tmp_path, learned, entities=["Snape"])).targets
    assert target.entities == ("Snape",)
    [target] = load_policy(_policy(tmp_path, {**learned, "entities": None})).targets
    artifact_terms = tuple(json.loads((ARTIFACT / "classifier.json").read_text())["entities"])
    assert target.entities and target.entities == artifact_terms


@pytest.mark.parametrize("spec,message", [
    ({"method": "gaussian_first_n", "dims": 8, "sigma": 1.0, "entities": ["Hermione"]}, "entities needs scope"),
    ({"method": "gaussian_first_n", "dims": 8, "sigma": 1.0, "scope": "entities", "entities": [" "]}, "non-empty"),
])
def test_entity_terms_in_a_spec_are_checked(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        CorruptionSpec.model_validate(spec)
    with pytest.raises(PolicyError, match="corruption_file"):
        load_policy(_policy(tmp_path, spec))


def test_entity_terms_are_read_from_a_list_or_a_names_mapping(tmp_path):
    (tmp_path / "terms.txt").write_text("# the target's names\nHarry Potter\n\n  Hogwarts \n")
    assert read_entity_terms(tmp_path / "terms.txt") == ["Harry Potter", "Hogwarts"]
    (tmp_path / "names.json").write_text(json.dumps({"names": {"people": {"Harry": "Tobin"},
                                                               "places": {"Hogwarts": "Caddonby"}}}))
    assert read_entity_terms(tmp_path / "names.json") == ["Harry", "Hogwarts"]
