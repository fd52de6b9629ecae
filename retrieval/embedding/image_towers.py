"""Opening an exported image tower in the backend and precision chosen for it (devices.py):
one place for ClipModel and the lean OnnxImageModel alike."""

from __future__ import annotations

from pathlib import Path

from .int8 import quantize_image_tower
from .onnx_image_tower import OnnxImageEncoder, session_options


def open_image_tower(path: Path, backend: str, precision: str):  # type: ignore[no-untyped-def]
    """A session on the float32 export at `path`: OpenVINO (fp32 or bf16), or ONNX Runtime on
    that graph (fp32) or on its int8 quantisation, made once and cached beside it."""
    if backend == "openvino":
        from .openvino_image_tower import OpenVinoImageEncoder  # optional dependency

        # Compiled graphs cached beside the export: later runs skip compiling (seconds).
        return OpenVinoImageEncoder(path, precision, cache=path.parent / "openvino")
    if precision == "int8":
        path = quantize_image_tower(path)
    # No spinning: idle ORT threads would otherwise busy-wait on the cores that the decoding
    # threads need.
    return OnnxImageEncoder(path, options=session_options(spinning=False))
