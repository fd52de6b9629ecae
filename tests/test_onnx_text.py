"""The ONNX text tower must embed like the torch model it was exported from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from retrieval.embedding.onnx_text_tower import OnnxTextEncoder, export_text_tower, weight_files  # noqa: E402
from retrieval.embedding.tokenizer import ClipTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

TEXTS = [
    "a photo of a dog",
    "a photo of a cat",
    "A RED CAR parked on the street.",
    "",
    "   ",
    "sunset over the mountains, 2019",
    "東京タワーの写真",
    "😀 party 🎉",
    "&amp; html entities &lt;b&gt;",
    "don't stop believin'",
    "the quick brown fox jumps over the lazy dog " * 12,  # truncated to 77 tokens
    "x",
    "1 2 3 4 5 6 7 8 9 10",
    "café naïve résumé",
    "a diagram of a transformer network",
    "<start_of_text> special <end_of_text>",
    "a blurry photo",
    "Привет мир",
    "snow",
    "two people walking on a beach at low tide with a dog",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The tiny model and its text tower exported the default way (optimized, weights apart)."""
    from retrieval.embedding.clip_model import ClipModel
    from retrieval.embedding.spec import ModelSpec

    model = ClipModel(ModelSpec("clipdex-tiny", "random", device="cpu"))
    path = tmp_path_factory.mktemp("onnx") / "text.onnx"
    export_text_tower(model.model, path, context_length=77)
    return model, path


def _assert_same_embeddings(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < 1e-5
    assert (ours * theirs).sum(axis=1).min() > 0.99999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_onnx_matches_torch(tiny: tuple[Any, Path]) -> None:
    model, path = tiny
    assert len(weight_files(path)) == 1
    encoder = OnnxTextEncoder(path)
    assert encoder.dim == model.dim
    _assert_same_embeddings(encoder.encode(ClipTokenizer()(TEXTS)), model.encode_texts(TEXTS))


def test_plain_export_matches_torch(tiny: tuple[Any, Path], tmp_path: Path) -> None:
    """optimize=False: one self-contained file, optimized when the session starts instead."""
    model, _ = tiny
    path = tmp_path / "plain.onnx"
    export_text_tower(model.model, path, context_length=77, optimize=False)
    assert [p.name for p in tmp_path.iterdir()] == ["plain.onnx"]
    tokens = ClipTokenizer()(TEXTS)
    for level in ("all", "disable"):
        _assert_same_embeddings(
            OnnxTextEncoder(path, optimization=level).encode(tokens), model.encode_texts(TEXTS)
        )


def test_batch_axis_is_dynamic(tiny: tuple[Any, Path]) -> None:
    _, path = tiny
    encoder = OnnxTextEncoder(path, threads=1)
    tokens = ClipTokenizer()(TEXTS)
    one_by_one = np.concatenate([encoder.encode(tokens[i : i + 1]) for i in range(len(TEXTS))])
    np.testing.assert_allclose(one_by_one, encoder.encode(tokens), atol=1e-6)
    assert encoder.encode(tokens[:0]).shape == (0, encoder.dim)
    assert encoder.context_length == 77


def test_session_options(tiny: tuple[Any, Path]) -> None:
    _, path = tiny
    tokens = ClipTokenizer()(TEXTS[:3])
    reference = OnnxTextEncoder(path).encode(tokens)
    for level in ("basic", "extended", "all"):
        for prepack in (False, True):
            encoder = OnnxTextEncoder(path, 2, optimization=level, prepack=prepack)
            np.testing.assert_allclose(encoder.encode(tokens), reference, atol=1e-5)
    with pytest.raises(ValueError, match="optimization"):
        OnnxTextEncoder(path, optimization="fastest")


def test_bad_token_shape(tiny: tuple[Any, Path]) -> None:
    _, path = tiny
    with pytest.raises(ValueError, match="shape"):
        OnnxTextEncoder(path).encode(np.zeros((2, 10), np.int64))


def test_reexport_replaces_and_cleans_up(tiny: tuple[Any, Path], tmp_path: Path) -> None:
    model, _ = tiny
    target = tmp_path / "text.onnx"
    target.write_bytes(b"old")
    export_text_tower(model.model, target, context_length=77)
    first = weight_files(target)
    export_text_tower(model.model, target, context_length=77)
    second = weight_files(target)
    assert len(first) == len(second) == 1 and first != second  # new weights file, old one removed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["text.onnx", second[0].name]
    )  # no temp files
    assert OnnxTextEncoder(target).dim == model.dim
    export_text_tower(model.model, target, context_length=77, optimize=False)
    assert [p.name for p in tmp_path.iterdir()] == ["text.onnx"]


def test_running_does_not_import_torch(tiny: tuple[Any, Path]) -> None:
    _, path = tiny
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from retrieval.embedding.onnx_text_tower import OnnxTextEncoder\n"
        "from retrieval.embedding.tokenizer import ClipTokenizer\n"
        f"v = OnnxTextEncoder(Path({str(path)!r})).encode(ClipTokenizer()(['a dog']))\n"
        "assert v.shape[0] == 1\n"
        "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
