"""The policy file: which forget targets the proxy guards, and how.

One pydantic schema, validated at load. Paths are relative to the policy file. Loading
builds every classifier before anything is swapped in, so a reload is all or nothing.

    version: harry-potter-demo-12
    targets:
      - name: harry_potter
        classifier: harry_potter/classifier      # artifact directory
        threshold: null                         # null: the artifact's calibrated threshold
        corruption_file: harry_potter/corruption.json   # a trainer result, or inline:
        # corruption: {method: gaussian_first_n, dims: 640, sigma: 4.0, scope: all}
        fail_mode: closed                       # a classifier error counts as flagged
    headers: none                               # what clients see of the verdict: full | flag | none
    dispatch: speculative                       # speculative: vLLM starts beside the gate | sequential
    hold: {max_bytes: 262144, max_tokens: 128}  # speculative: the most unverified output held
    audit:
      include_text: false
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from classifier import GateClassifier, load_classifier
from classifier.encoder import EncoderPool
from corruption.spec import CorruptionSpec
from proxy.protocol import field_errors


class PolicyError(ValueError):
    """The policy file is missing, malformed or points at unusable artifacts."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TargetConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    classifier: Path
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    corruption: CorruptionSpec | None = None
    corruption_file: Path | None = None
    entities: list[str] | None = None  # for scope "entities"; default: the corruption's, else the artifact's terms
    fail_mode: Literal["closed", "open"] = "closed"

    @model_validator(mode="after")
    def _one_corruption(self) -> "TargetConfig":
        if (self.corruption is None) == (self.corruption_file is None):
            raise ValueError("give exactly one of corruption (inline) or corruption_file")
        return self


class AuditConfig(_Strict):
    include_text: bool = False


class HoldConfig(_Strict):
    """The most of an unverified speculative answer the proxy keeps before the verdict; past it, the
    answer waits (in vLLM's socket), it is never released unverified."""

    max_bytes: int = Field(default=256 * 1024, ge=1024)
    max_tokens: int = Field(default=128, ge=1)  # stream events: one per token at vLLM's --stream-interval 1


VerdictHeaders = Literal["full", "flag", "none"]
Dispatch = Literal["speculative", "sequential"]


class PolicyConfig(_Strict):
    version: str = Field(min_length=1)
    targets: list[TargetConfig]  # may be empty: a pass-through proxy (used to measure the proxy alone)
    # What a client sees of the verdict: full (x-eco-flagged, -target, -score, -policy-version and the
    # guard's Server-Timing), flag (x-eco-flagged and the policy version), none (nothing: the safe default
    # for a public endpoint). The audit log always has everything.
    headers: VerdictHeaders = "none"
    # speculative: the request goes to vLLM as soon as it is validated, beside the gate, and vLLM's answer
    # is held until the verdict (unflagged: released as vLLM sent it; flagged: aborted, the corrupted
    # request sent, nothing of the first reaches the client). sequential: vLLM gets a request only after
    # the verdict, so the model never processes a raw flagged prompt.
    dispatch: Dispatch = "speculative"
    hold: HoldConfig = HoldConfig()
    audit: AuditConfig = AuditConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> "PolicyConfig":
        names = [t.name for t in self.targets]
        if len(names) != len(set(names)):
            raise ValueError(f"target names must be unique, got {names}")
        return self


@dataclass(frozen=True)
class ActiveTarget:
    name: str
    classifier: GateClassifier
    threshold: float
    corruption: CorruptionSpec
    entities: tuple[str, ...]
    fail_mode: Literal["closed", "open"]


@dataclass(frozen=True)
class ActivePolicy:
    version: str
    targets: tuple[ActiveTarget, ...]
    audit_include_text: bool
    source: Path
    headers: VerdictHeaders = "none"
    dispatch: Dispatch = "speculative"
    hold_max_bytes: int = HoldConfig().max_bytes
    hold_max_tokens: int = HoldConfig().max_tokens


def read_policy_config(path: Path) -> PolicyConfig:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PolicyError(f"cannot read policy {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"policy {path} is not valid YAML: {exc}") from exc
    try:
        return PolicyConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{field or '(top level)'}: {message}" for field, message in field_errors(exc))
        raise PolicyError(f"policy {path}: {problems}") from exc


def load_policy(path: str | Path, encoders: EncoderPool | None = None,
                hidden_size: int | None = None) -> ActivePolicy:
    """Validate the file and load every artifact it names. `encoders` is shared across reloads;
    `hidden_size` (the served model's) is checked against each corruption's dimensions."""
    path = Path(path).resolve()
    config = read_policy_config(path)
    encoders = EncoderPool() if encoders is None else encoders
    targets = tuple(_load_target(path.parent, i, t, encoders, hidden_size) for i, t in enumerate(config.targets))
    return ActivePolicy(config.version, targets, config.audit.include_text, path, config.headers, config.dispatch,
                        config.hold.max_bytes, config.hold.max_tokens)


def _load_target(base: Path, index: int, config: TargetConfig, encoders: EncoderPool,
                 hidden_size: int | None) -> ActiveTarget:
    where = f"targets.{index}"
    artifact = base / config.classifier
    try:
        classifier = load_classifier(artifact, encoders=encoders)
    except (OSError, ValueError, KeyError) as exc:
        raise PolicyError(f"{where}.classifier: cannot load classifier artifact {artifact}: {exc}") from exc
    if config.corruption is not None:
        corruption = config.corruption
    else:
        corruption_path = base / config.corruption_file
        try:
            corruption = CorruptionSpec.from_result_file(corruption_path)
        except (OSError, ValueError, KeyError) as exc:
            raise PolicyError(f"{where}.corruption_file: cannot load {corruption_path}: {exc}") from exc
    if hidden_size is not None:
        try:
            corruption.check_hidden_size(hidden_size)
        except ValueError as exc:
            field = "corruption" if config.corruption is not None else "corruption_file"
            raise PolicyError(f"{where}.{field}: {exc}") from exc
    entities = next(terms for terms in (config.entities, corruption.entities, classifier.entities_)
                    if terms is not None)
    if corruption.scope == "entities" and not entities:
        raise PolicyError(f"{where}.entities: scope 'entities' needs entity terms (none in the policy, the corruption "
                          "or the artifact)")
    threshold = config.threshold if config.threshold is not None else classifier.threshold_
    if threshold is None:
        raise PolicyError(f"{where}.threshold: the artifact is not calibrated; set a threshold")
    return ActiveTarget(config.name, classifier, float(threshold), corruption, tuple(entities), config.fail_mode)
