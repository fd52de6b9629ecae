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
            if precision == "bf16":
                self.path = compact_copy(core, self.path, Path(cache))
        try:
            model = core.read_model(str(self.path))
        except RuntimeError:
            if self.path == Path(path):
                raise
            # A damaged copy (a crash of the machine while it was written): drop it, use the export.
            for part in (self.path, self.path.with_suffix(".bin")):
                part.unlink(missing_ok=True)
            self.path = Path(path)
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


def compact_copy(core: Any, onnx_path: Path, folder: Path) -> Path:
    """The export in OpenVINO's own format with float16 weights, made once in `folder`.

    For bf16 runs only: the weights end in bfloat16 either way, and rounding them through float16
    first changes the embeddings by less than bf16 itself does (cosine to float32 0.99996 both
    ways on 64 imagenet-sample photos, ViT-B-32-256). Read from the ONNX file, the float32
    weights stay in memory beside the compiled ones; mapped from a float16 file they take half
    the room and are read in place: peak RSS of model alone 917 -> 598 MiB.
    """
    xml = folder / f"{onnx_path.stem}-f16.xml"
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        return xml
    import openvino as ov

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{xml.stem}.{os.getpid()}.tmp.xml"
    try:
        ov.save_model(core.read_model(str(onnx_path)), str(tmp), compress_to_fp16=True)
        for part in (tmp.with_suffix(".bin"), tmp):  # on disk before either name is taken
            with open(part, "rb") as f:
                os.fsync(f.fileno())
        # The .xml names no .bin: OpenVINO reads the file of the same stem, so the .bin goes
        # first and the .xml's rename marks the pair complete.
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError):
        return onnx_path  # a read-only cache: run from the export itself
    finally:
        for leftover in (tmp, tmp.with_suffix(".bin")):
            leftover.unlink(missing_ok=True)
    return xml
