"""What corruption to apply: one validated schema, shared by the policy file and the trainer.

Methods (ECO's family; "n" and "k" are both `dims`):

    gaussian_first_n   add N(0, sigma^2) noise to the first n dimensions
    gaussian_top_k     ... to each token's k largest-magnitude dimensions
    gaussian_random_n  ... to n dimensions drawn at random (once per prompt)
    zero_first_n       set the first n dimensions to zero
    zero_top_k         set each token's k largest-magnitude dimensions to zero
    flip_sign_first_n  negate the first n dimensions
    flip_sign_top_k    negate each token's k largest-magnitude dimensions
    add_value          add `value` to every dimension
    subtract_value     subtract `value` from every dimension
    reverse_order      reverse the order of the selected tokens
    shuffle            permute the selected tokens

`scope` picks the tokens: all prompt tokens, or only those inside the target's entity terms. With
scope `entities`, `other_sigma` (gaussian methods) adds noise of its own strength to the other prompt
tokens; unset or 0 leaves them untouched, which is what a spec without it always meant. `entities` names
the terms (a trainer writes the ones it learned with, so the strength and its tokens travel together);
unset, the target's own terms apply (the policy's, else the classifier artifact's). Special tokens
(BOS, the chat template's turn markers: the tokenizer's special and added tokens) stay uncorrupted
unless `corrupt_special_tokens` says otherwise.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Method = Literal[
    "gaussian_first_n", "gaussian_top_k", "gaussian_random_n",
    "zero_first_n", "zero_top_k",
    "flip_sign_first_n", "flip_sign_top_k",
    "add_value", "subtract_value",
    "reverse_order", "shuffle",
]
GAUSSIAN = ("gaussian_first_n", "gaussian_top_k", "gaussian_random_n")
NEEDS_DIMS = GAUSSIAN + ("zero_first_n", "zero_top_k", "flip_sign_first_n", "flip_sign_top_k")
NEEDS_VALUE = ("add_value", "subtract_value")


class CorruptionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method
    dims: int | None = Field(default=None, ge=1, description="n or k: how many dimensions")
    sigma: float | list[float] | None = Field(
        default=None, description="noise std; a list gives one std per dimension (gaussian_first_n)")
    value: float | None = Field(default=None, description="the constant of add_value / subtract_value")
    scope: Literal["all", "entities"] = "all"
    other_sigma: float | None = Field(
        default=None, ge=0, description="noise std on the tokens outside the entity terms (scope entities); "
                                        "unset or 0: untouched")
    entities: list[str] | None = Field(
        default=None, description="the terms whose tokens scope 'entities' corrupts; unset: the target's terms")
    corrupt_special_tokens: bool = Field(
        default=False, description="corrupt the tokenizer's special and added tokens too (BOS, turn markers)")

    @model_validator(mode="after")
    def _parameters_fit_method(self) -> "CorruptionSpec":
        m = self.method
        if m in NEEDS_DIMS and self.dims is None:
            raise ValueError(f"method {m} needs dims")
        if m in GAUSSIAN and self.sigma is None:
            raise ValueError(f"method {m} needs sigma")
        if m not in GAUSSIAN and self.sigma is not None:
            raise ValueError(f"sigma applies only to gaussian methods, not {m}")
        if m in NEEDS_VALUE and self.value is None:
            raise ValueError(f"method {m} needs value")
        if m not in NEEDS_VALUE and self.value is not None:
            raise ValueError(f"value applies only to add_value/subtract_value, not {m}")
        if m not in NEEDS_DIMS and self.dims is not None:
            raise ValueError(f"dims does not apply to {m}")
        if isinstance(self.sigma, list):
            if m != "gaussian_first_n":
                raise ValueError("a per-dimension sigma list needs method gaussian_first_n")
            if len(self.sigma) != self.dims:
                raise ValueError(f"sigma has {len(self.sigma)} entries but dims is {self.dims}")
        if self.other_sigma is not None and m not in GAUSSIAN:
            raise ValueError(f"other_sigma applies only to gaussian methods, not {m}")
        if self.other_sigma is not None and self.scope != "entities":
            raise ValueError("other_sigma needs scope 'entities' (with scope 'all' sigma covers every token)")
        if self.entities is not None and self.scope != "entities":
            raise ValueError("entities needs scope 'entities' (with scope 'all' every token is corrupted)")
        if self.entities is not None and not all(term.strip() for term in self.entities):
            raise ValueError("entities must be non-empty terms")
        sigmas = self.sigma if isinstance(self.sigma, list) else [self.sigma or 0.0]
        if any(s < 0 for s in sigmas):
            raise ValueError("sigma must be >= 0")
        return self

    @property
    def strength(self) -> float | list[float] | None:
        """The trainable parameter: sigma for noise, value for add/subtract, else None."""
        return self.sigma if self.method in GAUSSIAN else self.value

    def with_strength(self, strength: float | list[float]) -> "CorruptionSpec":
        field = "sigma" if self.method in GAUSSIAN else "value" if self.method in NEEDS_VALUE else None
        if field is None:
            raise ValueError(f"method {self.method} has no strength to set")
        return self.model_copy(update={field: strength})

    def with_fields(self, **values: Any) -> "CorruptionSpec":
        """A validated copy with these fields changed (e.g. the strengths a search tries)."""
        return CorruptionSpec.model_validate({**self.model_dump(), **values})

    def for_other_tokens(self) -> "CorruptionSpec":
        """The corruption of the tokens outside the entity terms: the same noise at `other_sigma`."""
        return self.model_copy(update={"sigma": self.other_sigma or 0.0, "other_sigma": None})

    def check_hidden_size(self, hidden_size: int) -> None:
        if self.dims is not None and self.dims > hidden_size:
            raise ValueError(f"dims {self.dims} exceeds the model's hidden size {hidden_size}")

    @classmethod
    def from_result_file(cls, path: str | Path) -> "CorruptionSpec":
        """The spec inside a trainer result JSON (or a bare spec JSON)."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        try:
            return cls.model_validate(data.get("spec", data))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors())
            raise ValueError(problems) from exc
