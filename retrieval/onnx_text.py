"""CLIP's text tower as an ONNX graph, run with onnxruntime: text queries without torch.

Exporting needs torch (and a loaded open_clip model); running does not, which is the point: a cold
query then pays for onnxruntime and a session (a fraction of a second) instead of importing torch
and open_clip (about ten seconds on a small machine). Pair with retrieval.tokenizer.ClipTokenizer.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# LayerNormalization became a single ONNX op in opset 17, which keeps the graph small and fast;
# torch's TorchScript exporter goes up to 20 and onnxruntime runs all of them.
OPSET = 17
INPUT_NAME = "tokens"
OUTPUT_NAME = "text_features"


def export_text_tower(model: Any, path: Path, context_length: int, opset: int = OPSET) -> None:
    """Write `model.encode_text` (unnormalised features) as ONNX: int64 tokens (batch,
    context_length) -> float32 (batch, dim), with a dynamic batch axis.

    `model` is an open_clip model (e.g. `ClipModel(...).model`). The graph is always fp32 on CPU:
    a model held in fp16 or on CUDA is copied first, the caller's model is left as it is. The file
    appears atomically (temp file in the same folder, then os.replace), so a reader never sees a
    half-written graph.
    """
    import torch

    class TextTower(torch.nn.Module):
        """encode_text as forward, the one method the exporter traces. Defined here, not at module
        level, so that importing this module does not import torch."""

        def __init__(self, clip: Any):
            super().__init__()
            self.clip = clip

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.clip.encode_text(tokens)

    path = Path(path)
    wrapper = TextTower(_fp32_cpu(model)).eval()
    example = torch.zeros((2, context_length), dtype=torch.int64)
    example[:, 0], example[:, 1] = 49406, 49407  # any ids work for tracing; these are start, end
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Known, harmless noise for a user: advanced indexing breaks on negative indices (the
            # pooling indexes with arange and argmax, never negative); the tracer freezes attention's
            # shape checks (only the batch axis varies, and tests run several batch sizes); the
            # TorchScript exporter is deprecated (see below).
            warnings.filterwarnings("ignore", message=".*advanced indexing.*", category=UserWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(torch|retrieval)\.")
            # The TorchScript exporter (dynamo=False): the dynamo one needs onnxscript, which is
            # not a dependency, and this graph has nothing the old exporter cannot trace.
            torch.onnx.export(
                wrapper,
                (example,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fp32_cpu(model: Any) -> Any:
    """`model` itself if it is already fp32 on CPU, else an fp32 CPU copy."""
    import copy

    import torch

    params = list(model.parameters()) + list(model.buffers())
    if all(
        p.device.type == "cpu" and (not p.is_floating_point() or p.dtype == torch.float32) for p in params
    ):
        return model
    return copy.deepcopy(model).float().cpu()


@dataclass(frozen=True)
class SessionConfig:
    """onnxruntime settings for the text session; defaults are the fastest measured for a cold query."""

    threads: int | None = None  # intra-op threads; None: onnxruntime's default (one per core)
    optimization: str = "all"  # disable | basic | extended | all


class OnnxTextEncoder:
    """Token ids -> unit-norm float32 text embeddings, with onnxruntime on the CPU."""

    def __init__(self, path: Path, threads: int | None = None, optimization: str = "all"):
        import onnxruntime as ort

        self.path = Path(path)
        self.config = SessionConfig(threads, optimization)
        opts = ort.SessionOptions()
        if optimization not in _OPT_LEVELS:
            raise ValueError(f"optimization must be one of {', '.join(_OPT_LEVELS)}, not {optimization!r}")
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[optimization])
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.context_length = int(inputs[0].shape[1])
        self.dim = int(outputs[0].shape[1])

    def encode(self, tokens: np.ndarray) -> np.ndarray:
        """(n, context_length) int ids -> (n, dim) float32 rows of unit length."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"tokens must have shape (n, {self.context_length}), not {tokens.shape}")
        if tokens.shape[0] == 0:
            return np.empty((0, self.dim), np.float32)
        feats = self.session.run([self.output_name], {self.input_name: tokens})[0]
        return _normalize(feats)


def _normalize(feats: np.ndarray) -> np.ndarray:
    # The same arithmetic as retrieval.model._normalize, so both paths give the same vectors.
    v = feats.astype(np.float32, copy=False)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return (v / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
