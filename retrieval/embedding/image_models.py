"""The one place that picks what embeds images for an index run: the lean OnnxImageModel when
the model's exports are cached and ONNX Runtime would run it anyway, else ClipModel.

The lean model gives the same vectors and signature as ClipModel on the onnx backend (cpu, fp32),
so the choice only changes the cost of starting: no torch or open_clip import, no model build.
Device, precision and backend are still chosen by embedding.devices; the one question it would
answer with torch ("auto": is there CUDA?) is answered here without torch when the answer is
certainly no, and left to devices.resolve_device otherwise.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import TypeAlias

from .clip_model import ClipModel
from .devices import resolve_backend, resolve_device, resolve_precision
from .model_manifest import read_manifest
from .onnx_image_model import OnnxImageModel
from .spec import ModelSpec

# What runs the exported graph without torch: ONNX Runtime (float32, or its int8 quantisation)
# and OpenVINO (float32, bfloat16). torch's own precisions (fp16 on CUDA, bf16 on torch) need it.
LEAN_PATHS = frozenset({("onnx", "fp32"), ("onnx", "int8"), ("openvino", "fp32"), ("openvino", "bf16")})

ImageModel: TypeAlias = ClipModel | OnnxImageModel
IMAGE_MODEL_TYPES = (ClipModel, OnnxImageModel)


def load_image_model(spec: ModelSpec) -> ImageModel:
    """The model to embed images with for `spec`: lean when it can be, ClipModel otherwise."""
    lean = lean_image_model(spec)
    return lean if lean is not None else ClipModel(spec)


def lean_image_model(spec: ModelSpec) -> OnnxImageModel | None:
    """The torch-free model for `spec`, or None when ClipModel is needed: the device is not
    the CPU (or cannot be known without torch), the backend is not ONNX Runtime in float32,
    or the cache lacks what a run needs (manifest, image export, text tower)."""
    device = spec.device if spec.device != "auto" else _auto_device_without_torch()
    if device is None:
        device = resolve_device(spec.device)  # a CUDA driver is installed: torch must say
    if not device.startswith("cpu"):
        return None
    precision = resolve_precision(spec.precision, device)
    backend = resolve_backend(spec.backend, device, precision)
    if (backend, precision) not in LEAN_PATHS:
        return None
    manifest = read_manifest(spec)
    if manifest is None or not manifest.usable_without_torch:
        return None
    return OnnxImageModel(spec, manifest, backend, precision)


def _auto_device_without_torch() -> str | None:
    """'cpu' where torch.cuda.is_available() is certainly False: there is no NVIDIA driver (CUDA
    needs its kernel module, which shows in /proc/driver/nvidia on Linux, or /dev/dxg under WSL;
    macOS has no CUDA builds of torch). None where CUDA may be there: then torch decides."""
    if sys.platform == "darwin":
        return "cpu"
    if sys.platform.startswith("linux"):
        driver = os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/dxg")
        return None if driver else "cpu"
    return None if shutil.which("nvidia-smi") else "cpu"  # Windows: nvidia-smi comes with the driver
