"""Decoding for an index run: reduced-scale JPEG decoding chosen from the model, each file hashed once."""

from __future__ import annotations

import hashlib
import math
import os
import types
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARCH, make_scene, set_mtime
from PIL import Image

import indexer.decode as decode_mod
import indexer.plan as plan_mod
from indexer import IndexOptions, index_folders
from indexer.decode import DRAFT_FACTOR, Decoded, DecodeOptions, decode_job, model_input_size
from indexer.plan import EmbedJob
from indexer.scan import FileInfo
from retrieval.index import ImageIndex


def file_info(path: Path) -> FileInfo:
    st = os.stat(path)
    return FileInfo(str(path), st.st_size, st.st_mtime_ns)


def spy_on_load_image(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int | None, tuple[int, int]]]:
    """(draft_size asked for, size decoded) of every load_image call the decoders make."""
    calls: list[tuple[int | None, tuple[int, int]]] = []
    real_load = decode_mod.load_image

    def load_image(data, **kw):  # type: ignore[no-untyped-def]
        loaded = real_load(data, **kw)
        calls.append((kw.get("draft_size"), loaded.image.size))
        return loaded

    monkeypatch.setattr(decode_mod, "load_image", load_image)
    return calls


# -- reduced-scale decoding ------------------------------------------------------------------------
def test_draft_size_follows_the_model_input_size():
    assert DecodeOptions().for_input_size(224).draft_size == math.ceil(DRAFT_FACTOR * 224)
    assert DecodeOptions(draft_size=500).for_input_size(224).draft_size == 500  # asked for: kept
    assert DecodeOptions(full_decode=True).for_input_size(224).draft_size is None
    assert DecodeOptions(draft_size=500, full_decode=True).for_input_size(224).draft_size is None
    assert model_input_size({"size": 256}) == 256
    assert model_input_size({"size": [224, 320]}) == 320  # (height, width): the larger side


def test_an_index_run_decodes_large_jpegs_at_a_reduced_scale(tmp_path, tiny_clip_model, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    make_scene(1, (1600, 1200)).save(photos / "big.jpg", "JPEG", quality=90)
    calls = spy_on_load_image(monkeypatch)
    summary = index_folders([photos], tmp_path / "index", tiny_clip_model, IndexOptions())
    assert summary.added == 1
    size = model_input_size(tiny_clip_model.preprocess_cfg)
    [(draft_size, decoded)] = calls
    assert draft_size == math.ceil(DRAFT_FACTOR * size)
    assert draft_size <= min(decoded) < 1200  # reduced, yet enough for the model's resize


def test_full_decode_turns_reduced_decoding_off(tmp_path, tiny_clip_model, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    make_scene(1, (1600, 1200)).save(photos / "big.jpg", "JPEG", quality=90)
    calls = spy_on_load_image(monkeypatch)
    options = IndexOptions(decode=DecodeOptions(full_decode=True))
    index_folders([photos], tmp_path / "index", tiny_clip_model, options)
    assert calls == [(None, (1600, 1200))]


def test_a_reduced_decode_embeds_close_to_a_full_one(tmp_path, tiny_clip_model):
    path = tmp_path / "big.jpg"
    make_scene(2, (1600, 1200)).save(path, "JPEG", quality=90)
    job = EmbedJob(file_info(path))
    size = model_input_size(tiny_clip_model.preprocess_cfg)
    full = decode_job(job, tiny_clip_model.preprocess, DecodeOptions(full_decode=True))
    reduced = decode_job(job, tiny_clip_model.preprocess, DecodeOptions().for_input_size(size))
    assert isinstance(full, Decoded) and isinstance(reduced, Decoded)
    assert (reduced.width, reduced.height) == (full.width, full.height) == (1600, 1200)
    a, b = tiny_clip_model.encode_images(torch.stack([full.pixels, reduced.pixels]))
    assert float(a @ b) > 0.99


@pytest.mark.parametrize(("flag", "full"), [([], False), (["--full-decode"], True)])
def test_the_index_command_passes_full_decode_on(tmp_path, monkeypatch, flag, full):
    from typer.testing import CliRunner

    import indexer
    from cli.main import app

    seen: list[IndexOptions] = []

    def fake_index_folders(roots, index_dir, spec, options, **kw):  # type: ignore[no-untyped-def]
        seen.append(options)
        return indexer.IndexSummary()

    monkeypatch.setattr(indexer, "index_folders", fake_index_folders)
    args = ["index", str(tmp_path), "--index", str(tmp_path / "index"), "-m", TINY_ARCH, "-p", "random"]
    result = CliRunner().invoke(app, args + flag)
    assert result.exit_code == 0, result.output
    [options] = seen
    assert options.decode.full_decode is full


# -- a file is hashed once ---------------------------------------------------------------------------
def count_sha256(monkeypatch: pytest.MonkeyPatch, *modules: types.ModuleType) -> list[int]:
    """One entry per sha256 object the given modules make (their own `hashlib` only)."""
    made: list[int] = []

    def sha256(*args: bytes) -> hashlib._Hash:  # type: ignore[name-defined]
        made.append(1)
        return hashlib.sha256(*args)

    for module in modules:
        monkeypatch.setattr(module, "hashlib", types.SimpleNamespace(sha256=sha256))
    return made


def same_size_pictures(folder: Path, *seeds: int) -> list[Path]:
    """BMP files of one size in bytes (same dimensions), different pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        p = folder / f"pic{seed}.bmp"
        make_scene(seed, (64, 48)).save(p, "BMP")
        paths.append(p)
    assert len({p.stat().st_size for p in paths}) == 1
    return paths


def test_a_new_file_hashed_as_a_move_candidate_is_not_hashed_again(tmp_path, tiny_clip_model, monkeypatch):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    old, new = same_size_pictures(photos, 1, 2)
    new.rename(tmp_path / new.name)  # kept aside: only `old` is indexed first
    index_folders([photos], index_dir, tiny_clip_model, IndexOptions())
    old.unlink()  # gone: its row is a move candidate for any new file of the same size
    (tmp_path / new.name).rename(new)
    made = count_sha256(monkeypatch, plan_mod, decode_mod)
    summary = index_folders([photos], index_dir, tiny_clip_model, IndexOptions())
    assert (summary.added, summary.moved, summary.removed) == (1, 0, 1)
    assert len(made) == 1  # the plan's hash, handed on to the decoder
    with ImageIndex.open(index_dir) as index:
        [record] = index.records().values()
    assert record.content_hash == hashlib.sha256(new.read_bytes()).hexdigest()


def test_a_plan_digest_is_not_trusted_once_the_file_changed(tmp_path, tiny_clip_model):
    path = tmp_path / "pic.png"
    make_scene(3, (64, 48)).save(path)
    job = EmbedJob(file_info(path), content_hash="0" * 64)  # what the plan saw, before a change
    make_scene(4, (64, 48)).save(path)
    set_mtime(path, job.info.mtime_ns + 2_000_000_000)
    result = decode_job(job, tiny_clip_model.preprocess, DecodeOptions())
    assert isinstance(result, Decoded)
    assert result.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_unchanged_file_keeps_the_plan_digest(tmp_path, tiny_clip_model, monkeypatch):
    path = tmp_path / "pic.png"
    make_scene(3, (64, 48)).save(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    made = count_sha256(monkeypatch, decode_mod)
    job = EmbedJob(file_info(path), content_hash=digest)
    result = decode_job(job, tiny_clip_model.preprocess, DecodeOptions())
    assert isinstance(result, Decoded) and result.content_hash == digest
    assert made == []


def test_exif_rotated_portrait_keeps_enough_pixels_when_reduced(tmp_path):
    # A portrait phone shot is stored sideways (landscape pixels, orientation 6).
    stored = make_scene(5, (1600, 1200))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "portrait.jpg"
    stored.save(path, "JPEG", quality=90, exif=exif.tobytes())
    result = decode_job(EmbedJob(file_info(path)), lambda im: im, DecodeOptions(draft_size=200))
    assert isinstance(result, Decoded)
    assert (result.width, result.height) == (1200, 1600)  # upright
    w, h = result.pixels.size
    assert h > w and 200 <= w < 1200  # turned, reduced, and the shortest side still covers the draft
