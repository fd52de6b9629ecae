"""Where and how a model runs: device, precision and backend, chosen in one place."""

from __future__ import annotations

import importlib.util

from retrieval.core.errors import ModelLoadError


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch  # seconds to import: only when the device is left to "auto"

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_backend(backend: str, device: str, precision: str) -> str:
    """ONNX Runtime for float32 on the CPU when it is installed: measured faster than eager
    torch there (bench/encode_options.py) with the same embeddings to ~1e-6. torch elsewhere."""
    if backend not in ("auto", "torch", "onnx"):
        raise ModelLoadError(f"unknown backend '{backend}': use auto, torch or onnx")
    if backend == "onnx" and (not device.startswith("cpu") or precision != "fp32"):
        raise ModelLoadError("the onnx backend runs float32 on the CPU: use --device cpu --precision fp32")
    if backend != "auto":
        return backend
    onnx_installed = importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx")
    if device.startswith("cpu") and precision == "fp32" and onnx_installed:
        return "onnx"
    return "torch"


def resolve_precision(precision: str, device: str) -> str:
    """fp16 on CUDA; fp32 on CPU. bf16 on CPU is opt-in: it only pays on CPUs with native
    bf16 arithmetic (avx512_bf16 / AMX), and these measurements were taken on one without."""
    if precision != "auto":
        if precision not in ("fp32", "bf16", "fp16"):
            raise ModelLoadError(f"unknown precision '{precision}': use fp32, bf16 or fp16")
        if precision == "fp16" and not device.startswith("cuda"):
            raise ModelLoadError("fp16 needs a CUDA device; on CPU use fp32 or bf16")
        return precision
    return "fp16" if device.startswith("cuda") else "fp32"
