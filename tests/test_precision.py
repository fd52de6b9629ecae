"""Precision and backend: chosen in one place (embedding.devices) as pure functions of the device,
the requested precision, the CPU's flags and the installed packages; lossy paths (bf16, int8)
stay within their stated fidelity of float32, exact ones stay exact."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ARCH, make_scene

from retrieval.core.errors import ModelLoadError
from retrieval.embedding.devices import cpu_flags, has_native_bf16, resolve_backend, resolve_precision

# /proc/cpuinfo "flags" of three kinds of CPU (abridged to what matters here)
AVX512 = ["fpu", "sse4_2", "avx2", "avx512f", "avx512_vnni"]
AMX_CPU = frozenset([*AVX512, "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"])  # Sapphire Rapids on
ZEN4_CPU = frozenset([*AVX512, "avx512_bf16"])  # bf16 without AMX
AVX2_CPU = frozenset(["fpu", "sse4_2", "avx2", "fma"])

EVERYTHING = frozenset({"onnx", "onnxruntime", "openvino"})
NO_OPENVINO = frozenset({"onnx", "onnxruntime"})
TORCH_ONLY: frozenset[str] = frozenset()

# Stated fidelity against float32 (cosine of each image's embedding), README "Precision per CPU".
BF16_MEAN, BF16_MIN = 0.999, 0.995
INT8_MEAN, INT8_MIN = 0.99, 0.98  # opt-in; on ViT-B-32-256 it measured far closer (README)


@pytest.fixture(autouse=True)
def _no_user_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite pins $CLIPDEX_PRECISION to fp32 (conftest); these tests are about "auto" itself."""
    monkeypatch.delenv("CLIPDEX_PRECISION", raising=False)


def has(packages: frozenset[str]):  # type: ignore[no-untyped-def]
    return packages.__contains__


# -- the choice, as pure functions ---------------------------------------------------------


def test_cpu_flags_come_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "avx512_bf16", "amx_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()
    assert has_native_bf16(AMX_CPU) and has_native_bf16(ZEN4_CPU) and not has_native_bf16(AVX2_CPU)


@pytest.mark.parametrize(
    ("device", "flags", "packages", "expected"),
    [
        ("cpu", AMX_CPU, EVERYTHING, "bf16"),  # native bf16 and OpenVINO to run it: measured faster
        ("cpu", ZEN4_CPU, EVERYTHING, "bf16"),
        ("cpu", AVX2_CPU, EVERYTHING, "fp32"),  # bf16 would be emulated
        ("cpu", AMX_CPU, NO_OPENVINO, "fp32"),  # torch's bf16 measured slower than ORT float32
        ("cpu", AMX_CPU, TORCH_ONLY, "fp32"),
        ("cuda", AVX2_CPU, TORCH_ONLY, "fp16"),
        ("cuda:1", AMX_CPU, EVERYTHING, "fp16"),
        ("mps", AMX_CPU, EVERYTHING, "fp32"),
    ],
)
def test_auto_precision_per_cpu(
    device: str, flags: frozenset[str], packages: frozenset[str], expected: str
) -> None:
    assert resolve_precision("auto", device, flags, has(packages)) == expected


def test_the_users_default_replaces_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPDEX_PRECISION", "fp32")
    assert resolve_precision("auto", "cpu", AMX_CPU, has(EVERYTHING)) == "fp32"
    assert resolve_precision("bf16", "cpu", AMX_CPU, has(EVERYTHING)) == "bf16"  # a named one wins
    monkeypatch.setenv("CLIPDEX_PRECISION", "int9")
    with pytest.raises(ModelLoadError, match="unknown precision 'int9'"):
        resolve_precision("auto", "cpu", AMX_CPU, has(EVERYTHING))


@pytest.mark.parametrize("flags", [AMX_CPU, AVX2_CPU])
def test_a_named_precision_is_kept(flags: frozenset[str]) -> None:
    # fp32 asked for stays fp32 even where bf16 would be chosen: the exact path stays exact.
    assert resolve_precision("fp32", "cpu", flags, has(EVERYTHING)) == "fp32"
    assert resolve_precision("bf16", "cpu", flags, has(TORCH_ONLY)) == "bf16"
    assert resolve_precision("int8", "cpu", flags, has(NO_OPENVINO)) == "int8"


def test_int8_is_opt_in_and_cpu_only() -> None:
    for device in ("cpu", "cuda"):
        for flags in (AMX_CPU, AVX2_CPU):
            assert resolve_precision("auto", device, flags, has(EVERYTHING)) != "int8"
    with pytest.raises(ModelLoadError, match="int8 runs on the CPU"):
        resolve_precision("int8", "cuda", AMX_CPU, has(EVERYTHING))
    with pytest.raises(ModelLoadError, match=r"clipdex\[onnx\]"):
        resolve_precision("int8", "cpu", AMX_CPU, has(frozenset({"openvino"})))
    with pytest.raises(ModelLoadError, match="unknown precision 'int4'"):
        resolve_precision("int4", "cpu", AMX_CPU, has(EVERYTHING))


@pytest.mark.parametrize(
    ("device", "precision", "packages", "expected"),
    [
        ("cpu", "fp32", EVERYTHING, "onnx"),  # ORT float32 measured faster than OpenVINO float32
        ("cpu", "fp32", TORCH_ONLY, "torch"),
        ("cpu", "bf16", EVERYTHING, "openvino"),
        ("cpu", "bf16", NO_OPENVINO, "torch"),
        ("cpu", "int8", EVERYTHING, "onnx"),
        ("cpu", "int8", NO_OPENVINO, "onnx"),
        ("cuda", "fp16", EVERYTHING, "torch"),
        ("cuda", "bf16", EVERYTHING, "torch"),
    ],
)
def test_auto_backend(device: str, precision: str, packages: frozenset[str], expected: str) -> None:
    assert resolve_backend("auto", device, precision, has(packages)) == expected


@pytest.mark.parametrize(
    ("backend", "device", "precision", "packages", "message"),
    [
        ("openvino", "cpu", "bf16", NO_OPENVINO, r"clipdex\[openvino\]"),
        ("openvino", "cuda", "fp16", EVERYTHING, "openvino backend runs fp32 or bf16 on the CPU"),
        ("openvino", "cpu", "int8", EVERYTHING, "openvino backend runs fp32 or bf16 on the CPU"),
        ("onnx", "cpu", "bf16", EVERYTHING, "onnx backend runs fp32 or int8 on the CPU"),
        ("torch", "cpu", "int8", EVERYTHING, "int8 runs on ONNX Runtime"),
        ("tensorrt", "cpu", "fp32", EVERYTHING, "unknown backend 'tensorrt'"),
    ],
)
def test_impossible_backends_are_one_line_errors(
    backend: str, device: str, precision: str, packages: frozenset[str], message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        resolve_backend(backend, device, precision, has(packages))


def test_named_backends_are_kept() -> None:
    assert resolve_backend("torch", "cpu", "bf16", has(EVERYTHING)) == "torch"
    assert resolve_backend("openvino", "cpu", "fp32", has(EVERYTHING)) == "openvino"


# -- the embeddings, on the tiny model -----------------------------------------------------

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def reference():  # type: ignore[no-untyped-def]
    """torch float32, straight from open_clip: what every other path is compared with."""
    from retrieval.embedding.clip_model import ClipModel
    from retrieval.embedding.spec import ModelSpec

    model = ClipModel(ModelSpec(TINY_ARCH, "random", device="cpu", precision="fp32", backend="torch"))
    pixels = torch.stack([model.preprocess(make_scene(seed, (120, 90))) for seed in range(24)])
    with torch.inference_mode():
        raw = model.model.encode_image(pixels).numpy()
    return pixels, raw / np.linalg.norm(raw, axis=1, keepdims=True)


def _model(precision: str, backend: str = "auto"):  # type: ignore[no-untyped-def]
    from retrieval.embedding.clip_model import ClipModel
    from retrieval.embedding.spec import ModelSpec

    return ClipModel(ModelSpec(TINY_ARCH, "random", device="cpu", precision=precision, backend=backend))


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    return np.sum(got.astype(np.float64) * want, axis=1)


def test_fp32_stays_exact(reference) -> None:  # type: ignore[no-untyped-def]
    pixels, want = reference
    for backend in ("torch", "onnx"):
        pytest.importorskip("onnxruntime")
        got = _model("fp32", backend).encode_images(pixels)
        assert np.abs(got - want).max() < 1e-5, backend


def test_bf16_on_torch_is_faithful(reference) -> None:  # type: ignore[no-untyped-def]
    pixels, want = reference
    model = _model("bf16", "torch")
    cos = _cosines(model.encode_images(pixels), want)
    assert cos.mean() >= BF16_MEAN and cos.min() >= BF16_MIN, (cos.mean(), cos.min())
    assert cos.min() < 1 - 1e-7  # bfloat16 indeed
    # The model itself stays float32: the ONNX exports cached for every precision come from it.
    assert {p.dtype for p in model.model.parameters()} == {torch.float32}
    texts = ["a dog", "a red car"]
    exact = _model("fp32", "torch").encode_texts(texts)
    np.testing.assert_allclose(model.encode_texts(texts), exact, atol=1e-6)


def test_int8_is_faithful_and_cached_beside_the_export(reference) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("onnxruntime")
    from retrieval.embedding.int8 import int8_path
    from retrieval.embedding.model_manifest import image_export_path

    pixels, want = reference
    model = _model("int8")
    assert (model.precision, model.backend) == ("int8", "onnx")
    cos = _cosines(model.encode_images(pixels), want)
    assert cos.mean() >= INT8_MEAN and cos.min() >= INT8_MIN, (cos.mean(), cos.min())
    assert cos.min() < 1 - 1e-6  # it is quantised indeed
    quantised = int8_path(image_export_path(model.signature))
    assert quantised.is_file() and quantised.parent == image_export_path(model.signature).parent
    made = quantised.stat().st_mtime_ns
    again = _model("int8")
    np.testing.assert_array_equal(again.encode_images(pixels[:4]), model.encode_images(pixels[:4]))
    assert quantised.stat().st_mtime_ns == made  # reused, not quantised again
    # the text side stays float32 torch
    np.testing.assert_allclose(model.encode_texts(["a dog"]), _model("fp32", "torch").encode_texts(["a dog"]))


def test_openvino_bf16_is_faithful_and_fp32_exact(reference) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    pixels, want = reference
    model = _model("bf16")
    assert model.backend == "openvino"
    cos = _cosines(model.encode_images(pixels), want)
    assert cos.mean() >= BF16_MEAN and cos.min() >= BF16_MIN, (cos.mean(), cos.min())
    exact = _model("fp32", "openvino")
    assert np.abs(exact.encode_images(pixels) - want).max() < 1e-5


def test_openvino_bf16_runs_from_a_float16_copy_made_once(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("openvino")
    from retrieval.embedding.model_manifest import image_export_path
    from retrieval.embedding.openvino_image_tower import OpenVinoImageEncoder

    pixels, want = reference
    export = image_export_path(_model("fp32", "onnx").signature)
    encoder = OpenVinoImageEncoder(export, "bf16", cache=tmp_path / "ov")
    assert encoder.path == tmp_path / "ov" / f"{export.stem}-f16.xml"
    assert encoder.path.with_suffix(".bin").stat().st_size < export.stat().st_size * 0.6  # float16 weights
    assert not list((tmp_path / "ov").glob(".*tmp*"))
    cos = _cosines(encoder.encode(pixels.numpy()), want)
    assert cos.mean() >= BF16_MEAN and cos.min() >= BF16_MIN, (cos.mean(), cos.min())
    made = encoder.path.stat().st_mtime_ns
    assert OpenVinoImageEncoder(export, "bf16", cache=tmp_path / "ov").path.stat().st_mtime_ns == made
    # float32 keeps the float32 weights: it is meant to be exact
    assert OpenVinoImageEncoder(export, "fp32", cache=tmp_path / "ov").path == export
    # a copy damaged by a crash of the machine is dropped: the run uses the export, and the next
    # one makes the copy again
    encoder.path.with_suffix(".bin").write_bytes(b"")
    damaged = OpenVinoImageEncoder(export, "bf16", cache=tmp_path / "ov")
    assert damaged.path == export and not encoder.path.exists()
    few = pixels.numpy()[:2]
    np.testing.assert_allclose(damaged.encode(few), encoder.encode(few), atol=1e-2)
    assert OpenVinoImageEncoder(export, "bf16", cache=tmp_path / "ov").path == encoder.path


def test_auto_device_without_a_cuda_driver_needs_no_torch(monkeypatch):
    from retrieval.embedding import devices

    monkeypatch.setattr(devices, "nvidia_driver_present", lambda: False)
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now raises
    assert devices.resolve_device("auto") == "cpu"
    assert devices.resolve_device("cuda:1") == "cuda:1"
