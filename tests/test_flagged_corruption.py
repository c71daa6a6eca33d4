"""The proxy's flagged path applies exactly the corruption the trainer learns: the same function and the same
masks (entity tokens at sigma, the others at other_sigma, special tokens untouched), for a completion and for a
chat rendered with the template; asserted on what the recording upstream received."""
from __future__ import annotations

import base64
import io

import pytest
import torch
from starlette.testclient import TestClient

from corruption.embeddings import EmbeddingTable
from corruption.prompt import corrupted_embeddings, special_token_ids, token_masks
from corruption.spec import CorruptionSpec
from corruption.trainer import CorruptionTrainer
from inprocess import STUB_MODEL, RecordingUpstream, build_app

pytestmark = pytest.mark.unit

SPEC = CorruptionSpec(method="gaussian_first_n", dims=640, sigma=2.0, other_sigma=0.5, scope="entities")
PROMPT = "Tell me about Hermione at Hogwarts."  # the keyword gate flags it; "Hermione" is the target's entity
KEY, TARGET = b"test-key", "harry_potter"  # as tests/inprocess.py builds the app


@pytest.fixture(scope="module")
def parts(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir), EmbeddingTable.from_model_dir(model_dir)


def _sent(model_dir, path: str, body: dict) -> torch.Tensor:
    upstream = RecordingUpstream()
    response = TestClient(build_app(model_dir, upstream, corruption=SPEC)).post(path, json=body)
    assert response.status_code == 200 and response.headers["x-eco-flagged"] == "true"
    [call] = [c for c in upstream.calls if not c.raw]
    return torch.load(io.BytesIO(base64.b64decode(call.body["prompt_embeds"])), weights_only=True)


def _rows_changed(table: EmbeddingTable, ids: list[int], sent: torch.Tensor) -> list[bool]:
    return [not torch.equal(a, b) for a, b in zip(table.embed(ids), sent)]


def test_a_flagged_completion_gets_the_trainers_corruption(model_dir, parts):
    tokenizer, table = parts
    sent = _sent(model_dir, "/v1/completions", {"model": STUB_MODEL, "prompt": PROMPT, "max_tokens": 4})
    trainer = CorruptionTrainer(object(), tokenizer, table, SPEC, entities=["Hermione"], secret_key=KEY,
                                check_embeddings=False)
    encoded = trainer._encode(PROMPT, SPEC)  # the trainer's tokens and masks for a probe
    assert torch.equal(sent, corrupted_embeddings(table, encoded.token_ids, SPEC, encoded.masks, KEY, TARGET))
    changed = _rows_changed(table, encoded.token_ids, sent)
    assert encoded.token_ids[0] == tokenizer.bos_token_id and not changed[0]  # <bos> untouched
    assert all(changed[1:])  # the entity at sigma, the rest at other_sigma
    noise = (sent.float() - table.embed(encoded.token_ids).float()).norm(dim=1)
    entity, other = encoded.masks.primary, encoded.masks.other
    assert entity.any() and noise[entity].min() > 2 * noise[other].max()


def test_a_flagged_chat_gets_the_same_corruption_on_its_rendered_tokens(model_dir, parts):
    tokenizer, table = parts
    messages = [{"role": "user", "content": PROMPT}]
    sent = _sent(model_dir, "/v1/chat/completions", {"model": STUB_MODEL, "messages": messages, "max_tokens": 4})
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded.input_ids
    masks = token_masks(SPEC, ids, encoded.offset_mapping, rendered, ["Hermione"], special_token_ids(tokenizer))
    assert torch.equal(sent, corrupted_embeddings(table, ids, SPEC, masks, KEY, TARGET))
    special = [tokenizer.convert_ids_to_tokens(i) for i, changed in zip(ids, _rows_changed(table, ids, sent))
               if not changed]
    assert {"<bos>", "<start_of_turn>", "<end_of_turn>"} <= set(special)  # the template's tokens stay as they are
    assert masks.primary.sum() >= 1 and masks.other.sum() >= 5
