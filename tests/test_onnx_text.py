"""The ONNX text tower must embed like the torch model it was exported from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from retrieval.onnx_text import OnnxTextEncoder, export_text_tower  # noqa: E402
from retrieval.tokenizer import ClipTokenizer  # noqa: E402

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
def tiny(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from retrieval.model import ClipModel, ModelSpec

    model = ClipModel(ModelSpec("clipdex-tiny", "random", device="cpu"))
    path = tmp_path_factory.mktemp("onnx") / "text.onnx"
    export_text_tower(model.model, path, context_length=77)
    return model, path


def test_onnx_matches_torch(tiny) -> None:  # type: ignore[no-untyped-def]
    model, path = tiny
    encoder = OnnxTextEncoder(path)
    ours = encoder.encode(ClipTokenizer()(TEXTS))
    theirs = model.encode_texts(TEXTS)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (len(TEXTS), model.dim)
    assert np.abs(ours - theirs).max() < 1e-5
    assert (ours * theirs).sum(axis=1).min() > 0.99999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_batch_axis_is_dynamic(tiny) -> None:  # type: ignore[no-untyped-def]
    _, path = tiny
    encoder = OnnxTextEncoder(path, threads=1)
    tokens = ClipTokenizer()(TEXTS)
    one_by_one = np.concatenate([encoder.encode(tokens[i : i + 1]) for i in range(len(TEXTS))])
    np.testing.assert_allclose(one_by_one, encoder.encode(tokens), atol=1e-6)
    assert encoder.encode(tokens[:0]).shape == (0, encoder.dim)
    assert encoder.context_length == 77


def test_session_options(tiny) -> None:  # type: ignore[no-untyped-def]
    _, path = tiny
    tokens = ClipTokenizer()(TEXTS[:3])
    reference = OnnxTextEncoder(path).encode(tokens)
    for level in ("disable", "basic", "extended"):
        np.testing.assert_allclose(OnnxTextEncoder(path, 1, level).encode(tokens), reference, atol=1e-5)
    with pytest.raises(ValueError, match="optimization"):
        OnnxTextEncoder(path, optimization="fastest")


def test_bad_token_shape(tiny) -> None:  # type: ignore[no-untyped-def]
    _, path = tiny
    with pytest.raises(ValueError, match="shape"):
        OnnxTextEncoder(path).encode(np.zeros((2, 10), np.int64))


def test_export_is_atomic_and_leaves_no_temp_files(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, _ = tiny
    target = tmp_path / "sub" / "text.onnx"
    target.parent.mkdir()
    target.write_bytes(b"old")
    export_text_tower(model.model, target, context_length=77)
    assert [p.name for p in target.parent.iterdir()] == ["text.onnx"]
    assert OnnxTextEncoder(target).dim == model.dim


def test_running_does_not_import_torch(tiny) -> None:  # type: ignore[no-untyped-def]
    _, path = tiny
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from retrieval.onnx_text import OnnxTextEncoder\n"
        "from retrieval.tokenizer import ClipTokenizer\n"
        f"v = OnnxTextEncoder(Path({str(path)!r})).encode(ClipTokenizer()(['a dog']))\n"
        "assert v.shape[0] == 1\n"
        "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
