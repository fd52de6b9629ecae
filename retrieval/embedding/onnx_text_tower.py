"""CLIP's text tower as an ONNX graph, run with onnxruntime: text queries without torch.

Exporting needs torch (and a loaded open_clip model); running does not, which is the point: a cold
query then pays for onnxruntime and a session (a few hundred milliseconds) instead of importing
torch and open_clip (about ten seconds on a small machine). Pair with retrieval.embedding.tokenizer.

What makes the session cheap to create (ViT-B-32 on a busy 2-core machine: 2.1 s -> 0.33 s median):
weights in a separate file next to the graph (not parsed out of a 250 MB protobuf), the graph
already optimized by onnxruntime at export time (nothing left to fuse at load), and no weight
prepacking (it costs more at load than it saves on one query).
"""

from __future__ import annotations

import copy
import glob
import os
import uuid
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
# onnxruntime level for the export-time optimization: 'extended' fuses attention, layer norm and
# gelu into its own CPU kernels; 'all' would add layout changes tied to this machine's CPU.
_SAVED_OPTIMIZATION = "extended"
_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def export_text_tower(
    model: Any, path: Path, context_length: int, opset: int = OPSET, optimize: bool = True
) -> None:
    """Write `model.encode_text` (unnormalised features) as ONNX: int64 tokens (batch,
    context_length) -> float32 (batch, dim), with a dynamic batch axis.

    `model` is an open_clip model (e.g. `ClipModel(...).model`). The graph is always fp32 on CPU:
    a model held in fp16 or on CUDA is copied first; the caller's model is left as it is.

    With `optimize` (the default, and what OnnxTextEncoder's defaults expect) onnxruntime optimizes
    the graph now and the weights go to a sibling file `<name>.<id>.data`; without it, `path` is one
    self-contained, portable ONNX file. Either way `path` appears atomically: weights first under a
    new name, then the graph by os.replace, then weights of earlier exports are removed.
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
    raw = path.with_name(f".{path.name}.{os.getpid()}.raw.tmp")
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
                str(raw),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        if optimize:
            _save_optimized(raw, path)
        else:
            os.replace(raw, path)
        _remove_stale_weights(path)
    finally:
        raw.unlink(missing_ok=True)


def _save_optimized(source: Path, path: Path) -> None:
    """Let onnxruntime optimize `source` and save the result as `path` plus a weights file."""
    import onnxruntime as ort

    # A new name each time, so that no weights are overwritten under a process reading them.
    weights = f"{path.name}.{uuid.uuid4().hex[:12]}.data"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.opt.tmp")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[_SAVED_OPTIMIZATION])
    opts.optimized_model_filepath = str(tmp)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", weights)
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"])
        os.replace(tmp, path)
    except BaseException:
        (path.parent / weights).unlink(missing_ok=True)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def weight_files(path: Path) -> list[Path]:
    """The weights files of the graph at `path`, in the naming export_text_tower uses."""
    path = Path(path)
    return sorted(path.parent.glob(glob.escape(path.name) + ".*.data"))


def _remove_stale_weights(path: Path) -> None:
    """Delete weights files that the graph now at `path` does not reference."""
    graph = path.read_bytes() if path.stat().st_size < (64 << 20) else b""  # optimized graphs are small
    for p in weight_files(path):
        if p.name.encode() not in graph:
            p.unlink(missing_ok=True)


def _fp32_cpu(model: Any) -> Any:
    """`model` itself if it is already fp32 on CPU, else an fp32 CPU copy."""

    import torch

    params = list(model.parameters()) + list(model.buffers())
    if all(
        p.device.type == "cpu" and (not p.is_floating_point() or p.dtype == torch.float32) for p in params
    ):
        return model
    return copy.deepcopy(model).float().cpu()


@dataclass(frozen=True)
class SessionConfig:
    """onnxruntime settings of a text session. The defaults are the fastest measured for a cold
    one-text query from an export_text_tower(optimize=True) file."""

    threads: int | None = None  # intra-op threads; None: onnxruntime's default, one per core
    optimization: str = "disable"  # disable | basic | extended | all; the file is optimized already
    prepack: bool = False  # repack weights for the CPU's matmul: pays off over many batches only


class OnnxTextEncoder:
    """Token ids -> unit-norm float32 text embeddings, with onnxruntime on the CPU.

    For a graph that onnxruntime has not optimized (export_text_tower(optimize=False), or a file
    from elsewhere) pass optimization="all"; for long-running use with many batches, prepack=True.
    """

    def __init__(
        self, path: Path, threads: int | None = None, *, optimization: str = "disable", prepack: bool = False
    ):
        import onnxruntime as ort

        if optimization not in _OPT_LEVELS:
            raise ValueError(f"optimization must be one of {', '.join(_OPT_LEVELS)}, not {optimization!r}")
        self.path = Path(path)
        self.config = SessionConfig(threads, optimization, prepack)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[optimization])
        if threads:
            opts.intra_op_num_threads = threads
        # Idle pool threads sleep instead of spinning: on a machine whose cores are busy with other
        # work, spinning threads took the CPU from the ones with work (measured: slower, not faster).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not prepack:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.context_length = int(inputs[0].shape[1])
        dim = outputs[0].shape[1]
        if not isinstance(dim, int):  # a symbolic axis: ask the graph
            dim = self.encode(np.zeros((1, self.context_length), np.int64)).shape[1]
        self.dim = int(dim)

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
    # The same arithmetic as retrieval.embedding.clip_model._normalize, so both paths give the same vectors.
    v = feats.astype(np.float32, copy=False)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return (v / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
