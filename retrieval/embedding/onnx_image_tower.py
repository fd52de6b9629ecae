"""The CLIP image tower as an ONNX graph, run by ONNX Runtime on the CPU.

On a small CPU the vision tower in ONNX Runtime (graph optimisations ORT_ENABLE_ALL, one
intra-op pool, sequential execution) is faster than eager torch float32, and gives the same
embeddings to ~1e-6; `bench/encode_options.py` measures both. Exporting needs torch; running
the exported graph does not: `OnnxImageEncoder` imports only numpy and onnxruntime, so an
indexer process can embed images without paying torch's import time and memory.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnxruntime as ort
    import torch

INPUT_NAME = "pixels"
OUTPUT_NAME = "embeddings"
OPSET = 17  # 17 has LayerNormalization as one op, which ONNX Runtime runs as one fused kernel


def export_image_tower(model: torch.nn.Module, path: str | os.PathLike[str], image_size: int) -> Path:
    """Write `model.encode_image` (an open_clip model) to `path` as ONNX with a dynamic batch axis.

    The graph outputs the raw (unnormalised) image features, like `encode_image`; the encoder
    normalises them. The file appears atomically (temp file + os.replace), so a reader never
    sees a half-written graph. A model not in float32 on the CPU is exported from a float32 CPU
    copy, leaving the caller's model as it was. Single-file ONNX is limited to 2 GB of weights
    (up to about ViT-H vision towers).
    """
    import torch

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    param = next(model.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu":
        model = copy.deepcopy(model).float().cpu()
    tower = _image_tower(model)  # export() itself runs it in eval mode, then restores the mode
    example = torch.zeros(2, 3, image_size, image_size, dtype=torch.float32)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    # nn.MultiheadAttention has a fused inference "fast path" (aten::_native_multi_head_attention)
    # that ONNX cannot express; it is taken under no_grad/inference_mode, so trace without it.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
            # The TorchScript-based exporter is deprecated in favour of the dynamo one, but that
            # one needs onnxscript, which is not a dependency; this one exports CLIP fine.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                tower,
                (example,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        os.replace(tmp, target)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        tmp.unlink(missing_ok=True)
    return target


def _image_tower(clip: torch.nn.Module) -> torch.nn.Module:
    """Only the image path: exporting the whole CLIP would trace the text tower too."""
    import torch

    class ImageTower(torch.nn.Module):  # defined here: torch is imported lazily
        def __init__(self) -> None:
            super().__init__()
            self.clip = clip

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.clip.encode_image(pixels)

    return ImageTower()


def session_options(
    threads: int | None = None, *, level: str = "all", parallel: bool = False, spinning: bool = True
) -> ort.SessionOptions:
    """ONNX Runtime options for the image tower; the defaults are the fastest measured on a 2-core
    AVX2 CPU (see bench/encode_options.py), the others are there to be measured against them.

    level: "basic" | "extended" | "all". "extended" adds the BiasGelu fusion (12 fewer Erf/Mul
    chains); "all" adds a blocked (NCHWc) layout for the patch convolution, no loss either way.
    parallel: ORT_PARALLEL execution with a 2-thread inter-op pool instead of ORT_SEQUENTIAL.
    spinning: whether idle intra-op threads busy-wait for the next op (ONNX Runtime's default)
    instead of sleeping; sleeping leaves the CPU to other threads of the process, e.g. decoding.
    """
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if level not in levels:
        raise ValueError(f"unknown optimisation level '{level}': use {', '.join(levels)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[level]
    opts.intra_op_num_threads = threads or _available_cpus()
    if parallel:
        opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        opts.inter_op_num_threads = 2
    else:
        # A ViT is one chain of ops: nothing can run side by side, so a second (inter-op) pool
        # would only add threads competing with the intra-op pool for the same cores.
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OnnxImageEncoder:
    """Embeds preprocessed images (N, 3, H, W) with an exported image tower; no torch needed.

    `threads` is the intra-op pool size (default: the CPUs this process may use); `options`
    replaces the session options altogether (for benchmarks).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        threads: int | None = None,
        *,
        options: ort.SessionOptions | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        opts = options or session_options(threads)
        self.threads = opts.intra_op_num_threads
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        hw = inp.shape[2:]
        self.image_size: tuple[int, int] | None = (
            (int(hw[0]), int(hw[1])) if all(isinstance(s, int) for s in hw) else None
        )
        self.images_encoded = 0

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """L2-normalised float32 embeddings (N, dim) of preprocessed pixels (N, 3, H, W)."""
        out = embed_batch(pixels, self.dim, lambda x: self.session.run(None, {self.input_name: x})[0])
        self.images_encoded += len(out)
        return out


def embed_batch(pixels: np.ndarray, dim: int, infer: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Check a batch of preprocessed pixels (N, 3, H, W), run `infer` on it, normalise the rows:
    what every runtime's image encoder does around its own inference call."""
    x = np.ascontiguousarray(pixels, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected pixels of shape (N, 3, H, W), got {x.shape}")
    if x.shape[0] == 0:
        return np.empty((0, dim), np.float32)
    feats = np.asarray(infer(x), dtype=np.float32)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return (feats / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def _available_cpus() -> int:
    """CPUs this process may run on (affinity and cpusets), not all the host's CPUs."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
