"""Where the fine-tuned gate's forward pass runs when it scores: torch, as trained, or ONNX Runtime.

On one CPU thread ONNX Runtime runs the same graph about twice as fast as torch for a short
piece; with int8 weights (dynamic quantisation, one scale per output channel) several times as
fast. int8 moves the margins a little, so a gate is calibrated on the runtime it serves with, and
the runtime is one of its hyperparameters. The ONNX graph is derived from the model's weights
when the scorer is built (a second or two), so an artifact holds one copy of the model, in
safetensors.
"""
from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

RUNTIMES = ("torch", "onnx", "onnx-int8")
DEFAULT_RUNTIME = "onnx-int8"


class Forward(Protocol):
    """logit(forget) - logit(retain) for a padded batch of token ids."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray: ...


class TorchForward:
    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            logits = self.model(input_ids, attention_mask)
        return (logits[:, 1] - logits[:, 0]).numpy()


class OnnxForward:
    """The model exported to ONNX (opset 17, batch and length dynamic), int8 or not, on `threads` threads."""

    def __init__(self, model: torch.nn.Module, quantize: bool, threads: int):
        import onnxruntime

        with tempfile.TemporaryDirectory(prefix="eco-gate-onnx-") as workdir:
            graph = Path(workdir) / "gate.onnx"
            _export(model, graph)
            if quantize:
                graph = _quantized(graph)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            self.session = onnxruntime.InferenceSession(graph.read_bytes(), options,
                                                        providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        # One piece at a time, without its padding: int8 activations are quantised with the range of the
        # whole input, so in a batch a piece's score would depend on its neighbours; and on one thread
        # the padding costs more than batching saves.
        margins = np.empty(len(input_ids), dtype=np.float32)
        for row, (ids, mask) in enumerate(zip(input_ids.numpy(), attention_mask.numpy())):
            length = int(mask.sum())
            logits = self.session.run(None, {"input_ids": ids[None, :length],
                                             "attention_mask": mask[None, :length]})[0]
            margins[row] = logits[0, 1] - logits[0, 0]
        return margins


def _export(model: torch.nn.Module, path: Path) -> None:
    example = (torch.ones((1, 4), dtype=torch.long), torch.ones((1, 4), dtype=torch.long))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on tracing the attention mask's shape arithmetic
        torch.onnx.export(model.eval(), example, str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                        "attention_mask": {0: "batch", 1: "tokens"}, "logits": {0: "batch"}})


def _quantized(graph: Path) -> Path:
    """int8 weights of every matrix product with a constant operand; activations quantised per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = graph.with_name("gate.int8.onnx")
    logging.disable(logging.WARNING)  # its advice to pre-process the graph goes to the root logger
    try:
        quantize_dynamic(graph, out, weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"MatMulConstBOnly": True})
    finally:
        logging.disable(logging.NOTSET)
    return out


def runtime_version(runtime: str) -> str:
    """The library and version that computes a runtime's scores: a threshold calibrated on one holds for it."""
    if runtime == "torch":
        return f"torch {torch.__version__}"
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


def forward_for(runtime: str, model: torch.nn.Module, threads: int) -> Forward:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime: {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return TorchForward(model)
    return OnnxForward(model, quantize=runtime == "onnx-int8", threads=threads)
