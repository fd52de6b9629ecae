"""The ONNX image tower gives the same embeddings as the torch model (tiny random model, fast)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

torch = pytest.importorskip("torch")

from retrieval.embedding.clip_model import ClipModel  # noqa: E402
from retrieval.embedding.onnx_image_tower import OnnxImageEncoder, export_image_tower, session_options  # noqa: E402
from retrieval.embedding.spec import ModelSpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny() -> ClipModel:
    # backend="torch": on the CPU ClipModel would pick ONNX Runtime itself, and torch is the reference.
    model = ClipModel(ModelSpec("clipdex-tiny", "random", device="cpu", precision="fp32", backend="torch"))
    assert model.backend == "torch"
    return model


@pytest.fixture(scope="module")
def exported(tiny: ClipModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "tiny-vision.onnx"
    assert export_image_tower(tiny.model, path, tiny.preprocess_cfg["size"][0]) == path
    return path


def _pixels(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


@pytest.mark.parametrize(("n", "seed"), [(1, 0), (3, 1), (8, 2)])
def test_onnx_equals_torch(tiny: ClipModel, exported: Path, n: int, seed: int) -> None:
    enc = OnnxImageEncoder(exported, threads=1)
    x = _pixels(n, enc.image_size[0] if enc.image_size else 64, seed)
    want = tiny.encode_images(torch.from_numpy(x))
    got = enc.encode(x)
    assert got.dtype == np.float32 and got.shape == want.shape == (n, tiny.dim)
    assert np.abs(got - want).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "kw", [{"level": "basic"}, {"level": "extended"}, {"parallel": True}, {"spinning": False}]
)
def test_session_option_variants_agree(tiny: ClipModel, exported: Path, kw: dict[str, Any]) -> None:
    x = _pixels(4, 64, 3)
    got = OnnxImageEncoder(exported, options=session_options(1, **kw)).encode(x)
    assert np.abs(got - tiny.encode_images(torch.from_numpy(x))).max() < 1e-4


def test_empty_batch_and_bad_shape(exported: Path, tiny: ClipModel) -> None:
    enc = OnnxImageEncoder(exported)
    assert enc.dim == tiny.dim and enc.image_size == (64, 64)
    assert enc.encode(np.empty((0, 3, 64, 64), np.float32)).shape == (0, tiny.dim)
    with pytest.raises(ValueError, match="N, 3, H, W"):
        enc.encode(np.zeros((3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="unknown optimisation level"):
        session_options(1, level="max")


def test_export_is_atomic_and_leaves_no_temp_file(tiny: ClipModel, tmp_path: Path) -> None:
    target = tmp_path / "sub" / "v.onnx"
    target.parent.mkdir()
    target.write_bytes(b"old")
    export_image_tower(tiny.model, target, 64)
    assert target.stat().st_size > 1000
    assert [p.name for p in target.parent.iterdir()] == ["v.onnx"]
    assert torch.backends.mha.get_fastpath_enabled()  # restored after export


def test_encoder_does_not_import_torch(exported: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from retrieval.embedding.onnx_image_tower import OnnxImageEncoder
        out = OnnxImageEncoder({str(exported)!r}).encode(np.zeros((2, 3, 64, 64), np.float32))
        assert out.shape[0] == 2
        assert "torch" not in sys.modules, "torch was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_torch_and_onnx_backends_embed_the_same_images(tmp_path: Path, monkeypatch) -> None:
    from conftest import make_scene

    spec = dict(arch="clipdex-tiny", pretrained="random", device="cpu", precision="fp32")
    by_torch = ClipModel(ModelSpec(**spec, backend="torch"))
    by_onnx = ClipModel(ModelSpec(**spec, backend="onnx"))
    by_onnx.warm_up()  # exports the tower (from the torch model) before torch is taken away below
    assert by_onnx._onnx_images is not None
    # From here on the ONNX model's torch image tower must not run: any use of it fails the test.
    monkeypatch.setattr(by_onnx.model, "encode_image", lambda *a, **k: pytest.fail("torch ran"))
    images = [make_scene(i, size) for i, size in enumerate([(64, 64), (96, 72), (50, 120), (200, 150)])]
    want = by_torch.encode_pil(images)
    got = by_onnx.encode_pil(images)
    # Each really is what it claims (a failed export would silently fall back to torch).
    assert (by_torch.backend, by_torch._onnx_images) == ("torch", None)
    assert by_onnx.backend == "onnx" and by_onnx._onnx_images.images_encoded == len(images)
    assert got.shape == want.shape == (len(images), by_torch.dim)
    assert np.abs(got - want).max() < 1e-4
    assert not np.allclose(want[0], want[1])  # distinct images: equality above is not trivial


def test_cuda_out_of_memory_halves_the_batch_and_remembers_it(monkeypatch) -> None:
    model = ClipModel(ModelSpec("clipdex-tiny", "random", device="cpu", precision="fp32", backend="torch"))
    x = torch.from_numpy(_pixels(10, 64, 4))
    want = model.encode_images(x)
    real = model.model.encode_image
    sizes: list[int] = []

    def small_batches_only(pixels):  # type: ignore[no-untyped-def]
        sizes.append(int(pixels.shape[0]))
        if pixels.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(pixels)

    monkeypatch.setattr(model.model, "encode_image", small_batches_only)
    before = model.images_encoded
    got = model.encode_images(x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert model.images_encoded - before == 10  # batches that ran out of memory are not counted
    # 10 and 5 ran out of memory; the second half of the 10 was split at once to the new size.
    assert model.max_batch == 2 and sizes == [10, 5, 2, 2, 1, 2, 2, 1]
    sizes.clear()
    np.testing.assert_allclose(model.encode_images(x[:4]), want[:4], atol=1e-5)
    assert sizes == [2, 2]  # remembered: no out-of-memory round trip again

    def never_fits(pixels):  # type: ignore[no-untyped-def]
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(model.model, "encode_image", never_fits)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # one image that does not fit: nothing to halve
        model.encode_images(x[:1])
