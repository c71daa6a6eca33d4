"""The embedding check: the backend must continue our uncorrupted prompt_embeds as it continues the text.

Unit tests pin the comparison; backend tests show the check passing on the real vLLM, a wrong
input-embedding scale failing it with a message that says what to do, and the proxy, the trainer
and the evaluation refusing to start on that wrong scale.
"""
from __future__ import annotations

import json
import math
import re

import pytest
from transformers import AutoTokenizer

from corruption.embedding_check import (
    CHECK_TOKENS,
    LOGPROB_TOLERANCE,
    TESTED_VLLM_VERSION,
    EmbeddingCheck,
    EmbeddingCheckResult,
    EmbeddingCheckUnavailable,
    compare_choices,
)
from corruption.embeddings import EmbeddingTable
from proxy_harness import start_proxy, train_tiny_policy

WRONG_SCALE = 1.0  # Gemma's is sqrt(640) = 25.3


def _choice(tokens: list[int], logprobs: list[float], top: list[dict[int, float]] | None = None) -> dict:
    names = [f"token_id:{t}" for t in tokens]
    top_named = [{f"token_id:{t}": v for t, v in row.items()} for row in top] if top else None
    return {"logprobs": {"tokens": names, "token_logprobs": logprobs, "top_logprobs": top_named}}


# ---------------------------------------------------------------- unit: the comparison


@pytest.mark.unit
def test_identical_continuations_agree():
    text = _choice([5, 6, 7], [-0.2, -0.1, -1.5])
    comparison = compare_choices(text, _choice([5, 6, 7], [-0.2, -0.1, -1.5]))
    assert comparison.agree and comparison.tokens_compared == 3 and comparison.max_logprob_difference == 0.0


@pytest.mark.unit
def test_logprobs_within_the_tolerance_agree_and_beyond_it_do_not():
    text = _choice([5, 6], [-0.2, -0.1])
    inside = compare_choices(text, _choice([5, 6], [-0.2 - LOGPROB_TOLERANCE / 2, -0.1]))
    assert inside.agree and inside.max_logprob_difference == pytest.approx(LOGPROB_TOLERANCE / 2)
    outside = compare_choices(text, _choice([5, 6], [-0.2, -0.1 - 2 * LOGPROB_TOLERANCE]))
    assert not outside.agree
    assert "token 2" in outside.detail and "tolerance" in outside.detail


@pytest.mark.unit
def test_a_different_token_fails_unless_it_is_a_near_tie():
    text = _choice([5, 6, 7], [-0.2, -0.70, -0.3], top=[{5: -0.2, 9: -3.0}, {6: -0.70, 8: -0.72}, {7: -0.3}])
    diverged = compare_choices(text, _choice([9, 6, 7], [-3.0, -0.70, -0.3]))
    assert not diverged.agree and "token 1 differs" in diverged.detail and "id 9" in diverged.detail
    near_tie = compare_choices(text, _choice([5, 8, 2], [-0.2, -0.72, -4.0]))
    assert near_tie.agree and near_tie.tokens_compared == 1 and "near-tie at token 2" in near_tie.detail
    unknown = compare_choices(text, _choice([5, 4, 2], [-0.2, -0.5, -4.0]))  # not among the text's candidates
    assert not unknown.agree and unknown.max_logprob_difference is None


@pytest.mark.unit
def test_missing_logprobs_or_lengths_fail():
    assert not compare_choices({"logprobs": None}, _choice([5], [-0.1])).agree
    assert not compare_choices(_choice([5, 6], [-0.1, -0.2]), _choice([5], [-0.1])).agree


@pytest.mark.unit
def test_result_gauge_values_and_json():
    results = {status: EmbeddingCheckResult(status, "m") for status in ("passed", "failed", "skipped", "pending")}
    assert [results[s].gauge_value for s in ("passed", "failed", "skipped")] == [1.0, 0.0, -1.0]
    assert math.isnan(results["pending"].gauge_value)
    assert [s for s, r in results.items() if r.ok] == ["passed", "skipped"]
    json.dumps(results["failed"].as_dict(), allow_nan=False)  # /ready can show it as it is


@pytest.mark.unit
def test_serve_option_and_environment_variable(monkeypatch):
    from proxy.cli import build_parser
    from proxy.commands import serve_settings

    monkeypatch.delenv("ECO_SKIP_EMBEDDING_CHECK", raising=False)
    assert serve_settings(build_parser().parse_args(["serve"])).skip_embedding_check is False
    assert serve_settings(build_parser().parse_args(["serve", "--skip-embedding-check"])).skip_embedding_check
    monkeypatch.setenv("ECO_SKIP_EMBEDDING_CHECK", "1")
    assert serve_settings(build_parser().parse_args(["serve"])).skip_embedding_check is True


# ---------------------------------------------------------------- backend: the real vLLM


UPSTREAM_KEY = "upstream-key"


@pytest.fixture(scope="module")
def keyed_backend(backend):
    """The backend behind a relay that answers 401 without its key, as a vLLM started with --api-key does."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import httpx

    class Relay(BaseHTTPRequestHandler):
        def _relay(self) -> None:
            if self.headers.get("authorization") != f"Bearer {UPSTREAM_KEY}":
                status, body = 401, json.dumps({"error": "Unauthorized"}).encode()
            else:
                length = int(self.headers.get("content-length") or 0)
                reply = httpx.request(self.command, backend.url + self.path, content=self.rfile.read(length),
                                      headers={"content-type": "application/json"}, timeout=120)
                status, body = reply.status_code, reply.content
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _relay

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Relay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def tokenizer(backend):
    return AutoTokenizer.from_pretrained(backend.model_dir)


def _assert_names_what_to_fix(message: str, backend, scale: float) -> None:
    assert "embedding check failed" in message
    assert f"vLLM {TESTED_VLLM_VERSION}" in message  # the backend's version, from its GET /version
    assert f"model {backend.served_model_name}" in message
    assert f"scaled by {scale:g}" in message
    assert "--embedding-scale" in message


@pytest.mark.backend
def test_check_passes_on_the_real_backend(backend, tokenizer):
    table = EmbeddingTable.from_model_dir(backend.model_dir)
    result = EmbeddingCheck(tokenizer, table, backend.served_model_name).run(backend.url)
    assert result.status == "passed", result.message
    assert result.backend_version == TESTED_VLLM_VERSION
    assert result.tokens_compared == CHECK_TOKENS
    assert result.max_logprob_difference <= LOGPROB_TOLERANCE
    assert result.scale == table.scale == pytest.approx(math.sqrt(640))


@pytest.mark.backend
def test_check_sends_the_upstream_key(backend, tokenizer, keyed_backend):
    from vllm_client.client import backend_is_ready

    table = EmbeddingTable.from_model_dir(backend.model_dir)
    assert backend_is_ready(keyed_backend, api_key=UPSTREAM_KEY) and not backend_is_ready(keyed_backend)
    keyed = EmbeddingCheck(tokenizer, table, backend.served_model_name, api_key=UPSTREAM_KEY).run(keyed_backend)
    assert keyed.status == "passed", keyed.message
    unkeyed = EmbeddingCheck(tokenizer, table, backend.served_model_name).run(keyed_backend)
    assert unkeyed.status == "failed" and "401" in unkeyed.message


@pytest.mark.backend
def test_wrong_scale_fails_with_the_message(backend, tokenizer):
    table = EmbeddingTable.from_model_dir(backend.model_dir, scale=WRONG_SCALE)
    result = EmbeddingCheck(tokenizer, table, backend.served_model_name).run(backend.url)
    assert result.status == "failed" and result.gauge_value == 0.0
    _assert_names_what_to_fix(result.message, backend, WRONG_SCALE)
    assert "the default for Gemma3ForCausalLM is 25.2982" in result.message


@pytest.mark.backend
def test_refused_request_and_unreachable_backend(backend, tokenizer):
    table = EmbeddingTable.from_model_dir(backend.model_dir)
    refused = EmbeddingCheck(tokenizer, table, "no-such-model").run(backend.url)
    assert refused.status == "failed" and "refused the check's text request: 404" in refused.message
    from vllm_client.server import free_port

    with pytest.raises(EmbeddingCheckUnavailable):
        EmbeddingCheck(tokenizer, table, backend.served_model_name).run(f"http://127.0.0.1:{free_port()}")


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return train_tiny_policy(tmp_path_factory.mktemp("policy"))


def _gauge(metrics) -> float:
    exposition = metrics.exposition().decode()
    return float(re.search(r"^eco_embedding_check (\S+)$", exposition, re.MULTILINE).group(1))


@pytest.mark.backend
def test_start_up_check_sets_the_state_and_the_gauge(backend, policy):
    """serve's own steps, in process: the result where /ready reads it, and the gauge."""
    from proxy import serve

    settings = serve.ServeSettings(policy=policy, backend_url=backend.url, model_dir=backend.model_dir,
                                   served_model_name=backend.served_model_name, secret_key="test")
    state = serve._build_state(settings, backend.model_dir, backend.url)
    assert state.embedding_check.status == "pending" and math.isnan(_gauge(state.metrics))
    assert serve._check_embeddings_at_start(state, settings, backend.url, backend_ready=False)
    assert state.embedding_check.status == "passed" and _gauge(state.metrics) == 1.0

    skipping = settings.model_copy(update={"skip_embedding_check": True})
    assert serve._check_embeddings_at_start(state, skipping, backend.url, backend_ready=False)
    assert state.embedding_check.status == "skipped" and _gauge(state.metrics) == -1.0

    wrong = settings.model_copy(update={"embedding_scale": WRONG_SCALE})
    state = serve._build_state(wrong, backend.model_dir, backend.url)
    assert not serve._check_embeddings_at_start(state, wrong, backend.url, backend_ready=False)
    assert state.embedding_check.status == "failed" and _gauge(state.metrics) == 0.0
    _assert_names_what_to_fix(state.embedding_check.message, backend, WRONG_SCALE)


@pytest.mark.backend
def test_proxy_start_passes_the_check(backend, policy, tmp_path):
    proxy = start_proxy(policy, backend.url, backend.model_dir, backend.served_model_name, tmp_path)
    try:
        log = proxy.log()
        assert "embedding check passed" in log
        assert log.index("embedding check passed") < log.index("eco-proxy ready")
        assert "embedding check passed)" in log  # the ready line says so
    finally:
        proxy.stop()


@pytest.mark.backend
def test_proxy_refuses_to_start_with_a_wrong_scale(backend, policy, tmp_path):
    with pytest.raises(RuntimeError) as refused:
        start_proxy(policy, backend.url, backend.model_dir, backend.served_model_name, tmp_path,
                    extra_env={"ECO_EMBEDDING_SCALE": str(WRONG_SCALE)})
    log = str(refused.value)
    assert "proxy exited with 3" in log
    _assert_names_what_to_fix(log, backend, WRONG_SCALE)
    assert "eco-proxy ready" not in log


@pytest.mark.backend
def test_proxy_skips_the_check_only_when_told_and_says_so(backend, policy, tmp_path):
    proxy = start_proxy(policy, backend.url, backend.model_dir, backend.served_model_name, tmp_path,
                        extra_env={"ECO_EMBEDDING_SCALE": str(WRONG_SCALE), "ECO_SKIP_EMBEDDING_CHECK": "true"})
    try:
        log = proxy.log()
        assert "WARNING" in log and "SKIP_EMBEDDING_CHECK" in log and "embedding check skipped)" in log
    finally:
        proxy.stop()


@pytest.mark.backend
def test_trainer_and_evaluation_refuse_a_wrong_scale(backend, tmp_path, capsys):
    from proxy.cli import main

    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": "The headmaster of Hogwarts is Albus", "answers": ["Dumbledore"]}) + "\n")
    code = main(["corruption", "train", "--backend-url", backend.url, "--model-dir", str(backend.model_dir),
                 "--probes", str(probes), "--goal", "0", "--out", str(tmp_path / "out.json"),
                 "--embedding-scale", str(WRONG_SCALE), "--steps", "1"])
    assert code == 2 and not (tmp_path / "out.json").exists()
    _assert_names_what_to_fix(capsys.readouterr().err, backend, WRONG_SCALE)

    code = main(["eval", "--raw", backend.url, "--guarded", backend.url, "--model-dir", str(backend.model_dir),
                 "--embedding-scale", str(WRONG_SCALE), "--out", str(tmp_path / "eval")])
    assert code == 2 and not (tmp_path / "eval").exists()
    _assert_names_what_to_fix(capsys.readouterr().err, backend, WRONG_SCALE)
