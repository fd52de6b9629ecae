"""A lean start: with the model's ONNX exports cached, indexing needs neither torch nor open_clip.

The lean model (embedding.onnx_image_model) must be indistinguishable from ClipModel to an index:
the same signature, the same vectors; it is only used for exactly the weights its manifest was
written for; and a new index made by it still gets its text tower.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ARCH, make_scene, write_scenes

from indexer import index_folders
from retrieval.embedding.spec import ModelSpec
from retrieval.index import ImageIndex
from retrieval.storage.catalog import open_catalog

ROOT = Path(__file__).resolve().parents[1]
SPEC = ModelSpec(TINY_ARCH, "random", device="cpu")


@pytest.fixture(scope="module")
def lean_cache(tmp_path_factory: pytest.TempPathFactory):
    """A user cache of its own, filled the way a first index run fills it (ClipModel exports)."""
    cache = tmp_path_factory.mktemp("lean-cache")
    photos = tmp_path_factory.mktemp("first-photos")
    write_scenes(photos, 3, seed0=40)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLIPDEX_CACHE", str(cache))
        summary = index_folders([photos], tmp_path_factory.mktemp("first") / "index", SPEC)
        assert summary.added == 3
        yield cache


@pytest.fixture
def in_lean_cache(lean_cache, monkeypatch) -> Path:
    monkeypatch.setenv("CLIPDEX_CACHE", str(lean_cache))
    return lean_cache


def vectors_by_name(index_dir: Path) -> dict[str, np.ndarray]:
    catalog = open_catalog(index_dir, create=False)
    try:
        records = catalog.records()
        ids = sorted(records)
        dim = int(catalog.model_signature()["dim"])
        vectors = catalog.embeddings(ids, dim)
    finally:
        catalog.close()
    return {Path(records[i].path).name: v for i, v in zip(ids, vectors)}


def test_lean_model_equals_clip_model(in_lean_cache, tiny_clip_model):
    from retrieval.embedding.clip_model import ClipModel
    from retrieval.embedding.image_models import load_image_model
    from retrieval.embedding.onnx_image_model import OnnxImageModel

    lean = load_image_model(SPEC)
    assert isinstance(lean, OnnxImageModel)
    assert lean.signature == tiny_clip_model.signature  # every field, what an index records
    assert lean.preprocess_cfg == tiny_clip_model.preprocess_cfg
    pictures = [make_scene(i, size) for i, size in enumerate([(96, 72), (72, 128), (64, 64), (300, 40)])]
    want = tiny_clip_model.encode_pil(pictures)  # ClipModel on ONNX Runtime, open_clip's transform
    got = lean.encode_pil(pictures)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
    torch_model = ClipModel(ModelSpec(TINY_ARCH, "random", device="cpu", backend="torch"))
    np.testing.assert_allclose(got, torch_model.encode_pil(pictures), atol=1e-5)
    assert lean.images_encoded == len(pictures)


def test_index_with_cached_exports_imports_neither_torch_nor_open_clip(
    in_lean_cache, tmp_path, tiny_clip_model
):
    """The whole run in a fresh process: nothing on its way (preprocessing, the batch stack, the
    text tower of the new index) may import torch or open_clip."""
    photos = tmp_path / "photos"
    write_scenes(photos, 5)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")  # a failure on the way imports nothing either
    reference = index_folders([photos], tmp_path / "reference", tiny_clip_model)  # torch, open_clip
    assert reference.added == 5
    # "auto" where no NVIDIA driver is installed (elsewhere torch must be asked whether CUDA works).
    no_driver = not os.path.exists("/proc/driver/nvidia/version") and not os.path.exists("/dev/dxg")
    device = "auto" if sys.platform.startswith("linux") and no_driver else "cpu"
    child = f"""
import json, sys
from indexer import index_folders
from retrieval.embedding.spec import ModelSpec
from retrieval.index import ImageIndex
s = index_folders([sys.argv[1]], sys.argv[2], ModelSpec({TINY_ARCH!r}, "random", device={device!r}))
print(json.dumps({{"added": s.added, "failed": len(s.failed),
                  "loaded": sorted(m for m in ("torch", "open_clip", "torchvision") if m in sys.modules)}}))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", child, str(photos), str(tmp_path / "lean")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"added": 5, "failed": 1, "loaded": []}
    lean, want = vectors_by_name(tmp_path / "lean"), vectors_by_name(tmp_path / "reference")
    assert sorted(lean) == sorted(want)
    for name in want:
        np.testing.assert_allclose(lean[name], want[name], atol=1e-5)
    # The new index has its text tower, copied from the cache: cold text queries stay torch-free.
    text = sorted(p.name for p in (tmp_path / "lean").glob("text-*"))
    assert text == sorted(p.name for p in (tmp_path / "reference").glob("text-*")) and len(text) == 2


def test_manifest_refused_for_other_weights(tmp_path, monkeypatch, tiny_checkpoint, other_checkpoint):
    """Keyed by the weights' identity and checked against it: a checkpoint rewritten in place, or a
    manifest under another model's name, sends the run back to ClipModel."""
    from retrieval.embedding.clip_model import ClipModel
    from retrieval.embedding.image_models import lean_image_model
    from retrieval.embedding.model_manifest import manifest_path, read_manifest
    from retrieval.embedding.text_embedder import save_text_tower

    monkeypatch.setenv("CLIPDEX_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "weights.pt"
    shutil.copyfile(tiny_checkpoint, ckpt)
    spec_a = ModelSpec(TINY_ARCH, str(ckpt), device="cpu")
    clip_a = ClipModel(spec_a)
    clip_a.warm_up()  # exports the image tower and writes the manifest
    assert lean_image_model(spec_a) is None  # the text tower is not known yet: a new index needs it
    save_text_tower(tmp_path / "index", clip_a)
    lean_a = lean_image_model(spec_a)
    assert lean_a is not None and lean_a.signature == clip_a.signature
    manifest_a = manifest_path(spec_a).read_text()

    shutil.copyfile(other_checkpoint, ckpt)  # other weights under the same path
    os.utime(ckpt, ns=(os.stat(ckpt).st_atime_ns, os.stat(ckpt).st_mtime_ns + 10**9))
    spec_b = ModelSpec(TINY_ARCH, str(ckpt), device="cpu")
    assert lean_image_model(spec_b) is None
    manifest_path(spec_b).write_text(manifest_a)  # A's manifest where B's would be
    assert read_manifest(spec_b) is None
    assert lean_image_model(spec_b) is None
    shutil.copyfile(tiny_checkpoint, ckpt)  # A's weights again: the manifest is A's to use
    assert lean_image_model(ModelSpec(TINY_ARCH, str(ckpt), device="cpu")) is not None


def test_lean_only_where_clip_model_would_run_an_exported_graph(in_lean_cache):
    from retrieval.embedding.devices import is_installed
    from retrieval.embedding.image_models import lean_image_model

    assert lean_image_model(SPEC) is not None
    assert lean_image_model(ModelSpec(TINY_ARCH, "random", device="cpu", backend="torch")) is None
    # bf16 runs the export through OpenVINO where it is installed; without it, torch is needed.
    bf16 = lean_image_model(ModelSpec(TINY_ARCH, "random", device="cpu", precision="bf16"))
    assert (bf16 is not None) == (is_installed("openvino") and is_installed("onnx"))
    assert lean_image_model(ModelSpec(TINY_ARCH, "random", device="cpu", seed=5)) is None  # not cached


def test_an_index_from_before_the_cache_fills_it(tmp_path, monkeypatch):
    """Upgrading: the image export is cached but the text tower only lies in an existing index
    (the indexer used to export it there); a run on that index puts it in the cache, so the next
    runs start without torch instead of never."""
    from retrieval.embedding.clip_model import ClipModel
    from retrieval.embedding.image_models import lean_image_model
    from retrieval.embedding.model_manifest import text_export_path
    from retrieval.embedding.onnx_text_tower import export_text_tower
    from retrieval.embedding.text_embedder import onnx_text_path, save_text_tower

    monkeypatch.setenv("CLIPDEX_CACHE", str(tmp_path / "cache"))
    clip = ClipModel(SPEC)
    clip.warm_up()
    index_dir = tmp_path / "old-index"
    export_text_tower(clip.model, onnx_text_path(index_dir, clip.signature), 77)
    assert lean_image_model(SPEC) is None and not text_export_path(clip.signature).exists()
    save_text_tower(index_dir, clip)
    assert text_export_path(clip.signature).is_file()
    assert lean_image_model(SPEC) is not None


def test_a_cold_text_search_imports_neither_torch_nor_sqlalchemy(in_lean_cache, tmp_path, tiny_clip_model):
    """A search in a fresh process reads the catalog on the driver (no SQLAlchemy: 0.28 s of a
    cold search) and embeds the text with the exported tower (no torch); same hits as here."""
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    write_scenes(photos, 6)
    index_folders([photos], index_dir, tiny_clip_model)
    with ImageIndex.open(index_dir) as index:
        want = [(h.id, round(h.score, 4)) for h in index.search_text("a red square", 4)]
    child = """
import json, sys
from retrieval.index import ImageIndex
with ImageIndex.open(sys.argv[1]) as index:
    hits = [(h.id, round(h.score, 4)) for h in index.search_text("a red square", 4)]
print(json.dumps({"hits": hits, "loaded": sorted(
    m for m in ("torch", "open_clip", "sqlalchemy") if m in sys.modules)}))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", child, str(index_dir)], capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert [tuple(h) for h in result["hits"]] == want
