"""Where and how a model runs: device, precision and backend, chosen in one place."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable, Iterable

from retrieval.core.errors import ModelLoadError

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
PRECISION_ENV = "CLIPDEX_PRECISION"  # the user's default in place of "auto"
BACKENDS = ("auto", "torch", "onnx", "openvino")
# CPU features with bfloat16 arithmetic in hardware; without them bf16 is emulated (slow).
NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where there is no /proc/cpuinfo):
    read from a text file so that choosing a precision needs no torch import."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86 | ARM
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_device(device: str) -> str:
    """The device for "auto": CUDA when torch sees it. Asking torch costs seconds of import, so where CUDA is
    certainly absent (no NVIDIA driver) the answer is "cpu" without it: that keeps the lean,
    torch-free index run (image_models.load_image_model) and cold queries light."""
    if device != "auto":
        return device
    if not nvidia_driver_present():
        return "cpu"
    import torch  # seconds to import: only where a CUDA driver is installed

    return "cuda" if torch.cuda.is_available() else "cpu"


def nvidia_driver_present() -> bool:
    """Whether CUDA could be there: its kernel driver shows in /proc/driver/nvidia on Linux (or
    /dev/dxg under WSL); macOS has no CUDA builds of torch; on Windows nvidia-smi comes with it."""
    if sys.platform == "darwin":
        return False
    if sys.platform.startswith("linux"):
        return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/dxg")
    return shutil.which("nvidia-smi") is not None


def has_native_bf16(flags: Iterable[str]) -> bool:
    return not NATIVE_BF16.isdisjoint(flags)


def is_installed(package: str) -> bool:
    """Whether `package` can be imported (found without importing it)."""
    return importlib.util.find_spec(package) is not None


Installed = Callable[[str], bool]


def resolve_backend(backend: str, device: str, precision: str, installed: Installed = is_installed) -> str:
    """What runs the image tower, for a resolved device and precision. `installed` tells which
    optional packages are there (a parameter so that every case can be tested on any machine).

    auto: on the CPU, ONNX Runtime for float32 (as fast as eager torch or OpenVINO float32, same
    embeddings to ~1e-6, no torch needed at run time) and int8 (only it runs the quantised graph);
    OpenVINO for bfloat16 (the fastest bf16 measured, and torch-free: bench/encode_options.py
    --suite precision, README "Precision per CPU"), else torch. torch on CUDA."""
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend '{backend}': use {', '.join(BACKENDS)}")
    cpu = device.startswith("cpu")
    if backend == "onnx" and (not cpu or precision not in ("fp32", "int8")):
        raise ModelLoadError("the onnx backend runs fp32 or int8 on the CPU: use --device cpu")
    if backend == "openvino":
        if not cpu or precision not in ("fp32", "bf16"):
            raise ModelLoadError("the openvino backend runs fp32 or bf16 on the CPU: use --device cpu")
        if not (installed("openvino") and installed("onnx")):
            raise ModelLoadError("the openvino backend needs OpenVINO: pip install 'clipdex[openvino]'")
    if backend == "torch" and precision == "int8":
        raise ModelLoadError("int8 runs on ONNX Runtime, not torch: use --backend auto or onnx")
    if backend != "auto":
        return backend
    onnx = installed("onnxruntime") and installed("onnx")
    if precision == "int8" or (cpu and precision == "fp32" and onnx):
        return "onnx"  # int8 without ONNX Runtime was refused by resolve_precision
    if cpu and precision == "bf16" and installed("openvino") and installed("onnx"):
        return "openvino"
    return "torch"


def resolve_precision(
    precision: str,
    device: str,
    flags: Iterable[str] | None = None,
    installed: Installed = is_installed,
) -> str:
    """The arithmetic of the image tower. auto: fp16 on CUDA; on the CPU, bf16 where the CPU has
    it in hardware (`flags`, default: this CPU's) and OpenVINO is installed to run it: measured
    about 3x ONNX Runtime float32 there, embeddings within cosine 0.9999 of float32. fp32
    elsewhere: without native bf16 it is emulated, and torch's bf16 (also faster there) would
    need torch at run time, which the float32 ONNX path does not. int8 is opt-in only: lossy
    (README, "Precision per CPU"). $CLIPDEX_PRECISION replaces "auto" with a choice of the
    user's own (for example fp32 everywhere, to keep embeddings bit-comparable across machines)."""
    if precision == "auto":
        precision = os.environ.get(PRECISION_ENV, "").strip().lower() or "auto"
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ModelLoadError(f"unknown precision '{precision}': use auto, {', '.join(PRECISIONS)}")
        if precision == "fp16" and not device.startswith("cuda"):
            raise ModelLoadError("fp16 needs a CUDA device; on CPU use fp32, bf16 or int8")
        if precision == "int8":
            if not device.startswith("cpu"):
                raise ModelLoadError("int8 runs on the CPU (ONNX Runtime): use --device cpu")
            if not (installed("onnxruntime") and installed("onnx")):
                raise ModelLoadError("int8 needs ONNX Runtime: pip install 'clipdex[onnx]'")
        return precision
    if device.startswith("cuda"):
        return "fp16"
    if not device.startswith("cpu"):
        return "fp32"
    native = has_native_bf16(cpu_flags() if flags is None else flags)
    return "bf16" if native and installed("openvino") and installed("onnx") else "fp32"
