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

from retrieval.model import ClipModel, ModelSpec  # noqa: E402
from retrieval.onnx_vision import OnnxImageEncoder, export_image_tower, session_options  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny() -> ClipModel:
    return ClipModel(ModelSpec("clipdex-tiny", "random", device="cpu", precision="fp32"))


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
        from retrieval.onnx_vision import OnnxImageEncoder
        out = OnnxImageEncoder({str(exported)!r}).encode(np.zeros((2, 3, 64, 64), np.float32))
        assert out.shape[0] == 2
        assert "torch" not in sys.modules, "torch was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
