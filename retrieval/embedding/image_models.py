"""The one place that picks what embeds images for an index run: the lean OnnxImageModel when
the model's exports are cached and ONNX Runtime would run it anyway, else ClipModel.

The lean model gives the same vectors and signature as ClipModel on the onnx backend (cpu, fp32),
so the choice only changes the cost of starting: no torch or open_clip import, no model build.
Device, precision and backend are chosen by embedding.devices, without torch where that is
possible.
"""

from __future__ import annotations

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
    the CPU (or cannot be known without torch), the backend and precision run no exported
    graph (LEAN_PATHS), or the cache lacks what a run needs (manifest, image export, text tower)."""
    device = resolve_device(spec.device)  # without torch where there is certainly no CUDA
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
