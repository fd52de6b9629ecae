"""The exported ONNX image tower run by OpenVINO on the CPU (optional: `pip install clipdex[openvino]`).

On CPUs with bfloat16 in hardware (AMX, avx512_bf16) OpenVINO runs the graph in bfloat16 at a
fraction of ONNX Runtime's float32 cost with embeddings within cosine 0.9999 of float32 (README,
"Precision per CPU"; `bench/encode_options.py --suite precision`). It reads the same ONNX file as
OnnxImageEncoder and, like it, needs neither torch nor open_clip.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .onnx_image_tower import _available_cpus, embed_batch

# clipdex precision -> OpenVINO's inference precision hint
_HINTS = {"fp32": "f32", "bf16": "bf16"}


class OpenVinoImageEncoder:
    """Embeds preprocessed images (N, 3, H, W) with an exported image tower through OpenVINO.

    `precision` "bf16" or "fp32" is passed as OpenVINO's inference precision hint (it would pick
    bf16 by itself on an AMX CPU: "fp32" has to be asked for). `cache` is a folder where
    OpenVINO keeps the compiled graph, so that later runs skip compiling it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        precision: str = "bf16",
        threads: int | None = None,
        cache: str | os.PathLike[str] | None = None,
    ) -> None:
        import openvino as ov

        if precision not in _HINTS:
            raise ValueError(f"OpenVINO runs fp32 or bf16, not '{precision}'")
        self.path = Path(path)
        self.precision = precision
        self.threads = threads or _available_cpus()
        core = ov.Core()
        if cache is not None:
            core.set_property({"CACHE_DIR": str(cache)})
        model = core.read_model(str(self.path))
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": _HINTS[precision],
            "INFERENCE_NUM_THREADS": self.threads,
            # One batch at a time, as fast as possible (not several streams in parallel).
            "PERFORMANCE_HINT": "LATENCY",
        }
        self._request = core.compile_model(model, "CPU", config).create_infer_request()
        out = model.outputs[0].get_partial_shape()
        self.dim = int(out[out.rank.get_length() - 1].get_length())
        hw = model.inputs[0].get_partial_shape()[2:]
        self.image_size: tuple[int, int] | None = (
            (int(hw[0].get_length()), int(hw[1].get_length())) if all(d.is_static for d in hw) else None
        )
        self.images_encoded = 0

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """L2-normalised float32 embeddings (N, dim) of preprocessed pixels (N, 3, H, W)."""
        # np.array copies: the request reuses its output buffer on the next call.
        out = embed_batch(pixels, self.dim, lambda x: np.array(self._request.infer({0: x})[0]))
        self.images_encoded += len(out)
        return out
