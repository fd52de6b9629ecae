"""The int8 image tower: ONNX Runtime dynamic quantisation of the exported float32 graph.

Opt-in (`--precision int8`): lossy, so never chosen automatically. Only the MatMuls whose second
input is a weight are quantised, per output channel (symmetric int8 weights; activations are
quantised per batch at run time, so no calibration set is needed); attention scores, softmax,
layer norms and GELU stay float32. With `mlp_only` only the MLP layers are quantised, as rclip's
own benchmarks try; `bench/encode_options.py --suite precision` reports the speed and fidelity
of both scopes. The quantised graph is cached next to the float32 export and, like it, needs
neither torch nor open_clip to run.
"""

from __future__ import annotations

import os
from pathlib import Path

# Which MatMuls are quantised. Measured on ViT-B-32-256 (README, "Precision per CPU"): all
# weight MatMuls is the faster scope and still faithful (mean cosine >= 0.999 on real photos).
MLP_ONLY = False


def int8_path(fp32_path: str | os.PathLike[str], mlp_only: bool = MLP_ONLY) -> Path:
    """Where the int8 graph of `fp32_path` is cached: beside it, named after it and the scope."""
    p = Path(fp32_path)
    return p.with_name(f"{p.stem}.int8-{'mlp' if mlp_only else 'matmul'}{p.suffix}")


def weight_matmuls(fp32_path: str | os.PathLike[str], mlp_only: bool = MLP_ONLY) -> list[str]:
    """Names of the MatMul nodes whose second input is a stored weight (not an activation);
    with `mlp_only`, of those in MLP blocks only (open_clip names them .../mlp/...)."""
    import onnx

    graph = onnx.load(str(fp32_path)).graph
    weights = {init.name for init in graph.initializer}
    return [
        node.name
        for node in graph.node
        if node.op_type == "MatMul"
        and len(node.input) == 2
        and node.input[1] in weights
        and (not mlp_only or "/mlp/" in node.name)
    ]


def quantize_image_tower(fp32_path: str | os.PathLike[str], mlp_only: bool = MLP_ONLY) -> Path:
    """The int8 graph of `fp32_path`, made once (atomically: a reader never sees half a file)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = int8_path(fp32_path, mlp_only)
    if target.is_file():
        return target
    nodes = weight_matmuls(fp32_path, mlp_only)
    if not nodes:
        raise ValueError(f"no MatMul with a weight to quantise in {fp32_path}")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        quantize_dynamic(
            str(fp32_path),
            str(tmp),
            weight_type=QuantType.QInt8,  # s8 weights x u8 activations: VNNI / AMX-int8 kernels
            per_channel=True,  # one scale per output channel: far less error than one per tensor
            nodes_to_quantize=nodes,
        )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
