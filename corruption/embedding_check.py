"""Does the backend read our embeddings as it reads text? One fixed prompt, asked both ways.

Everything the proxy and the trainer send for a flagged prompt is `prompt_embeds` that they
computed themselves: rows of the model's input-embedding matrix, scaled as the architecture
scales them. That scale is a convention of the serving engine, and vLLM has changed it between
versions (Gemma's sqrt(hidden_size) moved from inside the model's forward to the embedding
lookup). A backend with another convention would still answer every request, only with every
flagged prompt's meaning shifted before the corruption is even added; nothing would fail.

So before any of them spends a request on a backend, it sends one fixed prompt twice: as text,
and as its own *uncorrupted* embeddings of that text, greedy, with the sampled tokens' logprobs.
The check passes when both continuations have the same token ids and every generated token's
logprob differs by at most `LOGPROB_TOLERANCE` (nats). On vLLM 0.32 with the right scale the two
agree exactly (difference 0.0); a wrong scale changes the tokens (scale 1.0 for Gemma) or moves
the logprobs well past the tolerance.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from corruption.embeddings import EmbeddingTable, architecture_scale
from vllm_client import BackendUnavailable, VllmClient, prompt_embeds_base64, request_body_with_embeds
from vllm_client.client import normalise_url

log = logging.getLogger(__name__)

# The vLLM release this project is tested with: pyproject's extras, deploy/compose.yaml and
# deploy/k8s/vllm-deployment.yaml name the same one (tests/test_deploy.py keeps them in step).
TESTED_VLLM_VERSION = "0.32.0"

# A plain-knowledge prompt with confident continuations (no forget target in it), so that a
# near-tie between two next tokens is unlikely on any model.
CHECK_PROMPT = "The capital of France is Paris. The capital of Japan is"
CHECK_TOKENS = 8
# Largest accepted |logprob(text) - logprob(embeddings)| of a generated token, in nats. The
# right scale gives 0.0 on vLLM 0.32 (CPU); the margin absorbs batch-dependent float noise of
# a backend busy with other requests. A wrong convention is orders of magnitude away.
LOGPROB_TOLERANCE = 0.1
TOP_LOGPROBS = 2  # to tell a near-tie between two tokens from a real divergence
ATTEMPTS = 2  # a mismatch is asked again once before it counts (noise on a busy backend)

Status = Literal["passed", "failed", "skipped", "pending"]
_GAUGE = {"passed": 1.0, "failed": 0.0, "skipped": -1.0, "pending": math.nan}


class EmbeddingCheckUnavailable(BackendUnavailable):
    """The backend could not be asked (unreachable, timed out): no verdict either way."""


@dataclass(frozen=True)
class EmbeddingCheckResult:
    status: Status
    message: str
    backend_url: str | None = None
    backend_version: str | None = None
    model: str | None = None
    scale: float | None = None
    tokens_compared: int = 0
    max_logprob_difference: float | None = None
    tolerance: float = LOGPROB_TOLERANCE

    @property
    def ok(self) -> bool:
        """Passed, or skipped on purpose: the caller may go on."""
        return self.status in ("passed", "skipped")

    @property
    def gauge_value(self) -> float:
        """For the `eco_embedding_check` gauge: 1 passed, 0 failed, -1 skipped, NaN not yet run."""
        return _GAUGE[self.status]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def skipped(cls, embeddings: EmbeddingTable, model: str | None = None, option: str = "--skip-embedding-check"
                ) -> "EmbeddingCheckResult":
        return cls("skipped", f"the embedding check was skipped ({option}): nothing verifies that the backend "
                              f"scales input embeddings as this process does (scale {embeddings.scale:g})",
                   model=model, scale=embeddings.scale)

    @classmethod
    def pending(cls, backend_url: str, embeddings: EmbeddingTable, model: str | None = None
                ) -> "EmbeddingCheckResult":
        return cls("pending", f"the embedding check waits for the backend at {backend_url}",
                   backend_url=backend_url, model=model, scale=embeddings.scale)


@dataclass(frozen=True)
class Comparison:
    """The text continuation against the embeddings continuation, token by token."""

    agree: bool
    tokens_compared: int
    max_logprob_difference: float | None  # None: the continuations parted where no difference is known
    detail: str


def compare_choices(text_choice: Mapping[str, Any], embeds_choice: Mapping[str, Any],
                    tolerance: float = LOGPROB_TOLERANCE) -> Comparison:
    """Same token ids, logprobs within `tolerance`. Where the two part ways on a near-tie (the
    embeddings' token is among the text's top candidates, within `tolerance` of the text's own
    pick) the rest cannot be compared, and what came before decides."""
    text_lp, embeds_lp = text_choice.get("logprobs") or {}, embeds_choice.get("logprobs") or {}
    text_tokens, embeds_tokens = text_lp.get("tokens") or [], embeds_lp.get("tokens") or []
    text_values, embeds_values = text_lp.get("token_logprobs") or [], embeds_lp.get("token_logprobs") or []
    text_top = text_lp.get("top_logprobs") or [None] * len(text_tokens)
    if not text_tokens or not embeds_tokens:
        return Comparison(False, 0, None, "the backend returned no token logprobs")
    worst = 0.0
    compared = 0
    for i, (t_token, e_token, t_value, e_value) in enumerate(zip(text_tokens, embeds_tokens, text_values,
                                                                 embeds_values)):
        if t_token != e_token:
            alternative = (text_top[i] or {}).get(e_token) if i < len(text_top) else None
            if alternative is not None and abs(alternative - e_value) <= tolerance \
                    and abs(alternative - t_value) <= tolerance:
                return Comparison(True, compared, worst, f"near-tie at token {i + 1}; the {compared} before agree")
            difference = None if alternative is None else max(worst, abs(alternative - e_value))
            return Comparison(False, compared, difference,
                              f"token {i + 1} differs: from text {_token(t_token)} (logprob {t_value:.3f}), "
                              f"from embeddings {_token(e_token)} (logprob {e_value:.3f})")
        difference = abs(t_value - e_value)
        worst = max(worst, difference)
        compared += 1
        if difference > tolerance:
            return Comparison(False, compared, worst,
                              f"token {i + 1} ({_token(t_token)}) has logprob {t_value:.3f} from text and "
                              f"{e_value:.3f} from embeddings (difference {difference:.3f} > tolerance {tolerance})")
    if len(text_tokens) != len(embeds_tokens):
        return Comparison(False, compared, worst, f"{len(text_tokens)} tokens from text, {len(embeds_tokens)} "
                                                  "from embeddings")
    return Comparison(True, compared, worst, f"{compared} tokens agree (largest logprob difference {worst:.4f})")


def _token(token: str) -> str:
    return token.replace("token_id:", "id ") if token.startswith("token_id:") else repr(token)


class EmbeddingCheck:
    """The check for one model: its tokenizer, its embedding table, the name the backend serves it as, and
    `api_key`, the backend's key when its vLLM was started with `--api-key`."""

    def __init__(self, tokenizer: Any, embeddings: EmbeddingTable, model: str, prompt: str = CHECK_PROMPT,
                 max_tokens: int = CHECK_TOKENS, tolerance: float = LOGPROB_TOLERANCE, attempts: int = ATTEMPTS,
                 api_key: str | None = None):
        self.tokenizer = tokenizer
        self.embeddings = embeddings
        self.model = model
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.tolerance = tolerance
        self.attempts = attempts
        self.api_key = api_key

    def run(self, base_url: str, timeout: float = 120.0) -> EmbeddingCheckResult:
        """Ask the backend; a verdict (passed or failed), or EmbeddingCheckUnavailable."""
        base_url = normalise_url(base_url)
        token_ids = list(self.tokenizer(self.prompt)["input_ids"])
        payload = prompt_embeds_base64(self.embeddings.embed(token_ids))
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0.0,
                "logprobs": TOP_LOGPROBS, "return_tokens_as_token_ids": True}
        with VllmClient(base_url, timeout=timeout, api_key=self.api_key) as client:
            version = client.version()
            result = {"backend_url": base_url, "backend_version": version, "model": self.model,
                      "scale": self.embeddings.scale, "tolerance": self.tolerance}
            comparison = None
            for _ in range(self.attempts):
                text, error = _complete(client, {**body, "prompt": self.prompt})
                if error:
                    return EmbeddingCheckResult("failed", self._refused("text", error, version, base_url), **result)
                embeds, error = _complete(client, request_body_with_embeds(body, payload))
                if error:
                    return EmbeddingCheckResult("failed", self._refused("prompt_embeds", error, version, base_url),
                                                **result)
                comparison = compare_choices(text["choices"][0], embeds["choices"][0], self.tolerance)
                if comparison.agree:
                    break
        assert comparison is not None
        measured = {"tokens_compared": comparison.tokens_compared,
                    "max_logprob_difference": comparison.max_logprob_difference}
        if comparison.agree:
            message = (f"embedding check passed: {self.model} at {base_url} (vLLM {version}) continues the "
                       f"prompt's embeddings (scale {self.embeddings.scale:g}) as it continues its text: "
                       f"{comparison.detail}")
            return EmbeddingCheckResult("passed", message, **result, **measured)
        detail = comparison.detail
        prompt_tokens = (text.get("usage") or {}).get("prompt_tokens")
        if prompt_tokens is not None and prompt_tokens != len(token_ids):
            detail += (f"; the backend counts {prompt_tokens} prompt tokens where this tokenizer makes "
                       f"{len(token_ids)}: is the model directory the one the backend serves?")
        return EmbeddingCheckResult("failed", self._mismatch(detail, version, base_url), **result, **measured)

    def _scale_origin(self) -> str:
        config_path = Path(self.embeddings.source).parent / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError):
            return "origin unknown"
        architecture = ", ".join(config.get("architectures") or ["?"])
        default = architecture_scale(config)
        if default is None:
            return f"given with --embedding-scale; {architecture} has no known default"
        if math.isclose(default, self.embeddings.scale, rel_tol=1e-9):
            return f"the default for {architecture}"
        return f"given with --embedding-scale; the default for {architecture} is {default:g}"

    def _mismatch(self, detail: str, version: str, base_url: str) -> str:
        return (f"embedding check failed: the backend at {base_url} (vLLM {version}, model {self.model}) does not "
                f"continue this process's uncorrupted prompt_embeds as it continues the same text ({detail}). "
                f"The input embeddings were scaled by {self.embeddings.scale:g} ({self._scale_origin()}); this "
                f"backend expects another convention, so every flagged prompt would be corrupted on top of "
                f"wrongly scaled embeddings. Run the tested vLLM {TESTED_VLLM_VERSION}, or set --embedding-scale "
                f"to the scale this backend expects; --skip-embedding-check starts anyway, unverified.")

    def _refused(self, kind: str, error: str, version: str, base_url: str) -> str:
        hint = " Is vLLM started with --enable-prompt-embeds?" if kind == "prompt_embeds" else ""
        return (f"embedding check failed: the backend at {base_url} (vLLM {version}, model {self.model}) refused "
                f"the check's {kind} request: {error}.{hint} Input-embedding scale {self.embeddings.scale:g} "
                f"({self._scale_origin()}; --embedding-scale); tested with vLLM {TESTED_VLLM_VERSION}.")


def _complete(client: VllmClient, body: dict[str, Any] | list[bytes]) -> tuple[dict[str, Any], str | None]:
    try:
        reply = client.request_json("POST", "/v1/completions", body)
    except BackendUnavailable as exc:
        raise EmbeddingCheckUnavailable(f"the backend did not answer the embedding check ({exc})") from exc
    if reply.status != 200:
        return {}, f"{reply.status} {reply.text[:300]}"
    if not isinstance(reply.body, dict):
        return {}, "the answer is not JSON"
    if not reply.body.get("choices"):
        return {}, "no choices in the answer"
    return reply.body, None


def run_or_skip(check: EmbeddingCheck, base_url: str, skip: bool) -> EmbeddingCheckResult:
    """For the batch tools (trainer, evaluation): the check, or a loud warning when it is skipped."""
    if skip:
        result = EmbeddingCheckResult.skipped(check.embeddings, check.model)
        log.warning("WARNING: %s", result.message)
        return result
    return check.run(base_url)
