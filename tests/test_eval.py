"""`clipdex eval`: every figure equals a direct computation from the same embeddings.

The direct computations here are deliberately naive (a full argsort per query, walking down the
ranking until a relevant item turns up), independent of retrieval.evaluation.metrics's counting.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ARCH, make_scene, write_scenes
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from retrieval.evaluation import metrics
from retrieval.evaluation.datasets import CaptionSet, DatasetError, LabelledSet, load_dataset
from retrieval.search.query import default_templates


# -- direct computations ------------------------------------------------------------------------
def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def direct_ranks(queries: np.ndarray, candidates: np.ndarray, relevant: list[set[int]]) -> list[int]:
    ranks = []
    for q, rel in zip(queries, relevant):
        order = np.argsort(-(candidates @ q), kind="stable")
        ranks.append(next(pos + 1 for pos, c in enumerate(order) if int(c) in rel))
    return ranks


def direct_figures(ranks: list[int], ks=(1, 5, 10)) -> dict:
    return {
        "recall": {k: sum(r <= k for r in ranks) / len(ranks) for k in ks},
        "median": float(np.median(ranks)),
        "mean": sum(ranks) / len(ranks),
    }


def assert_figures(fig: metrics.RankFigures, want: dict) -> None:
    for k, v in want["recall"].items():
        assert fig.recall[k] == pytest.approx(v, abs=1e-12), k
    assert fig.median_rank == want["median"]
    assert fig.mean_rank == pytest.approx(want["mean"])


def random_unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    return unit(rng.standard_normal((n, d))).astype(np.float32)


# -- metrics on synthetic embeddings ------------------------------------------------------------
def test_text_to_image_and_image_to_text_equal_direct_rankings():
    rng = np.random.default_rng(0)
    images = random_unit(rng, 40)
    owner = np.repeat(np.arange(40), rng.integers(1, 6, 40))  # 1-5 captions per image
    # Captions near their image, so that the ranks spread over the whole range.
    texts = unit(images[owner] + 0.9 * rng.standard_normal((len(owner), 16))).astype(np.float32)

    t2i = metrics.text_to_image(images, texts, owner)
    want = direct_ranks(texts.astype(np.float64), images.astype(np.float64), [{int(o)} for o in owner])
    assert_figures(t2i, direct_figures(want))
    assert (t2i.queries, t2i.candidates) == (len(owner), 40)
    assert 0 < t2i.recall[1] < t2i.recall[10] < 1  # the test data exercise the counting

    i2t = metrics.image_to_text(images, texts, owner)
    mine = [set(np.flatnonzero(owner == i).tolist()) for i in range(40)]
    want = direct_ranks(images.astype(np.float64), texts.astype(np.float64), mine)
    assert_figures(i2t, direct_figures(want))


def test_zero_shot_top_k_equals_direct_argsort():
    rng = np.random.default_rng(1)
    classes = random_unit(rng, 12)
    labels = rng.integers(0, 12, 60)
    images = unit(classes[labels] + 1.2 * rng.standard_normal((60, 16))).astype(np.float32)
    fig = metrics.zero_shot(images, classes, labels)
    ranks = direct_ranks(images.astype(np.float64), classes.astype(np.float64), [{int(c)} for c in labels])
    assert_figures(fig, direct_figures(ranks, ks=(1, 5)))
    assert fig.chance_recall == {1: pytest.approx(1 / 12), 5: pytest.approx(5 / 12)}


def test_chance_figures_are_those_of_a_random_ranking():
    # One relevant of N: recall@K = K/N, median rank (N+1)/2.
    fig = metrics.rank_figures(np.array([1, 2, 3]), 1000, np.ones(3, np.int64), (1, 5, 10))
    assert fig.chance_recall == {1: pytest.approx(0.001), 5: pytest.approx(0.005), 10: pytest.approx(0.01)}
    assert fig.chance_median_rank == 500.5
    # Five relevant of 50: P(none in the top 10) = C(45, 10) / C(50, 10).
    fig = metrics.rank_figures(np.array([1]), 50, np.array([5]), (10,))
    assert fig.chance_recall[10] == pytest.approx(1 - math.comb(45, 10) / math.comb(50, 10))
    survive = [math.comb(45, k) / math.comb(50, k) for k in range(47)]
    assert fig.chance_median_rank == next(k for k, p in enumerate(survive) if p <= 0.5)


def test_ties_count_against_the_model():
    """A collapsed model (every score equal) ranks the relevant item last, not first."""
    images = np.tile(np.array([[1.0, 0.0]], np.float32), (5, 1))
    texts = np.tile(np.array([[1.0, 0.0]], np.float32), (5, 1))
    fig = metrics.text_to_image(images, texts, np.arange(5))
    assert fig.recall[1] == 0.0 and fig.median_rank == 5


def test_large_sets_are_scored_in_blocks_with_the_same_result():
    rng = np.random.default_rng(2)
    images = random_unit(rng, 300, 8)
    owner = rng.integers(0, 300, 2500)  # more queries than one block
    texts = unit(images[owner] + rng.standard_normal((2500, 8))).astype(np.float32)
    fig = metrics.text_to_image(images, texts, owner)
    scores = texts @ images.T
    direct = 1 + ((scores >= scores[np.arange(2500), owner][:, None]).sum(axis=1) - 1)
    assert fig.recall[10] == pytest.approx(float(np.mean(direct <= 10)))


# -- reading datasets ---------------------------------------------------------------------------
def test_caption_tsv_with_header_relative_paths_and_missing_images(tmp_path: Path):
    write_scenes(tmp_path / "img", 3)
    tsv = tmp_path / "captions.tsv"
    tsv.write_text(
        "image\tcaption\n"
        "img/scene000.png\ta red thing\n"
        "img/scene001.png\ta blue thing\n"
        "img/scene000.png\tanother red thing\n"
        "img/gone.png\tnot there\n"
        "img/scene002.png\tgreen\n"
    )
    ds = load_dataset(tsv)
    assert isinstance(ds, CaptionSet)
    assert [Path(p).name for p in ds.images] == ["scene000.png", "scene001.png", "scene002.png"]
    assert ds.captions == ("a red thing", "a blue thing", "another red thing", "green")
    assert ds.caption_image.tolist() == [0, 1, 0, 2]
    assert [Path(p).name for p in ds.missing] == ["gone.png"]
    # The folder holding captions.tsv reads the same.
    assert load_dataset(tmp_path).captions == ds.captions


def test_label_tsv_class_folders_and_coco(tmp_path: Path):
    write_scenes(tmp_path / "cats", 2, prefix="c")
    write_scenes(tmp_path / "dogs", 3, seed0=10, prefix="d")
    folders = load_dataset(tmp_path)
    assert isinstance(folders, LabelledSet)
    assert folders.classes == ("cats", "dogs") and folders.image_class.tolist() == [0, 0, 1, 1, 1]

    tsv = tmp_path / "labels.tsv"  # no header: shared texts make it a labelled set
    tsv.write_text("cats/c000.png\tcat\ndogs/d000.png\tdog\ncats/c001.png\tcat\n")
    labelled = load_dataset(tsv)
    assert isinstance(labelled, LabelledSet) and labelled.image_class.tolist() == [0, 1, 0]
    named = tmp_path / "named.tsv"  # a header naming the columns, extra columns ignored
    named.write_text("index\tname\tfile\n0\tcat\tcats/c000.png\n1\tdog\tdogs/d000.png\n")
    assert load_dataset(named).classes == ("cat", "dog")

    ann = tmp_path / "annotations"
    ann.mkdir()
    (tmp_path / "val").mkdir()
    make_scene(1).save(tmp_path / "val" / "1.jpg")
    coco = {
        "images": [{"id": 7, "file_name": "1.jpg"}, {"id": 8, "file_name": "absent.jpg"}],
        "annotations": [
            {"image_id": 7, "caption": "first"},
            {"image_id": 8, "caption": "lost"},
            {"image_id": 7, "caption": "second"},
        ],
    }
    (ann / "captions_val.json").write_text(json.dumps(coco))
    ds = load_dataset(ann / "captions_val.json")
    assert isinstance(ds, CaptionSet)
    assert ds.captions == ("first", "second") and len(ds.images) == 1 and len(ds.missing) == 1


def test_bad_datasets_are_one_line_errors(tmp_path: Path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nope.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("only-one-column\n")
    with pytest.raises(DatasetError, match="row 1"):
        load_dataset(bad)
    gone = tmp_path / "gone.tsv"
    gone.write_text("a.png\tx\n")
    with pytest.raises(DatasetError, match="none of its 1 images"):
        load_dataset(gone)


# -- the command, end to end, against the model's own embeddings --------------------------------
def embed_direct(model, paths: list[str], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings straight from the torch model (no decode pool, no batching)."""
    with torch.inference_mode():
        pixels = torch.stack([model.preprocess(Image.open(p).convert("RGB")) for p in paths])
        images = model.model.encode_image(pixels).float().numpy()
        texts_v = model.model.encode_text(model.tokenizer(texts)).float().numpy()
    return unit(images), unit(texts_v)


def run_eval(args: list[str]) -> dict:
    # torch for the images too, as the direct computation (ONNX Runtime agrees only to ~1e-6)
    result = CliRunner().invoke(app, ["eval", *args, "--backend", "torch", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_eval_command_on_captions_equals_direct_computation(tmp_path: Path, tiny_clip_model):
    paths = write_scenes(tmp_path / "img", 12)
    (tmp_path / "img" / "broken.png").write_text("not an image")  # left out, reported
    rows, owner, captions = [], [], []
    for i, p in enumerate(paths):
        for c in range(1 + i % 3):
            captions.append(f"scene {i} variant {c}")
            owner.append(i)
            rows.append(f"img/{p.name}\t{captions[-1]}")
    rows.append("img/broken.png\tnever seen")
    (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")

    out = run_eval([str(tmp_path / "pairs.tsv"), "--model", TINY_ARCH, "--pretrained", "random"])

    images, texts = embed_direct(tiny_clip_model, [str(p) for p in paths], captions)
    t2i = direct_figures(direct_ranks(texts, images, [{o} for o in owner]))
    mine = [{j for j, o in enumerate(owner) if o == i} for i in range(len(paths))]
    i2t = direct_figures(direct_ranks(images, texts, mine))
    assert (out["images"], out["captions"]) == (12, len(captions))
    assert [f["path"] for f in out["failed"]] == [str(tmp_path / "img" / "broken.png")]
    for got, want in ((out["text_to_image"], t2i), (out["image_to_text"], i2t)):
        assert {int(k): v for k, v in got["recall"].items()} == pytest.approx(want["recall"], abs=1e-12)
        assert got["median_rank"] == want["median"]
        assert got["mean_rank"] == pytest.approx(want["mean"])
    assert out["text_to_image"]["chance_recall"]["1"] == pytest.approx(1 / 12)


def test_eval_command_on_class_folders_with_and_without_ensemble(tmp_path: Path, tiny_clip_model):
    names = ["red ball", "green tree", "blue sky"]
    paths, labels = [], []
    for c, name in enumerate(names):
        for p in write_scenes(tmp_path / name.replace(" ", "_"), 3, seed0=10 * c, prefix="x"):
            paths.append(str(p))
            labels.append(c)

    out = run_eval([str(tmp_path), "--model", TINY_ARCH, "--pretrained", "random"])

    images, plain = embed_direct(tiny_clip_model, paths, names)
    templates = default_templates()
    _, prompts = embed_direct(
        tiny_clip_model, paths[:1], [t.replace("{}", n) for n in names for t in templates]
    )
    ensemble = unit(prompts.reshape(len(names), len(templates), -1).mean(axis=1))
    for key, classes in (("zero_shot", plain), ("zero_shot_ensemble", ensemble)):
        want = direct_figures(direct_ranks(images, classes, [{c} for c in labels]), ks=(1, 5))
        got = out[key]
        assert {int(k): v for k, v in got["recall"].items()} == pytest.approx(want["recall"], abs=1e-12)
        assert got["median_rank"] == want["median"]
    assert out["classes"] == 3 and out["images"] == 9


def test_a_tsv_beside_an_images_folder_finds_them_there(tmp_path: Path):
    """Flickr8k's layout: captions.tsv names bare files that sit in images/."""
    write_scenes(tmp_path / "images", 2)
    (tmp_path / "captions.tsv").write_text("image\tcaption\nscene000.png\tone\nscene001.png\ttwo\n")
    ds = load_dataset(tmp_path)
    assert ds.images == tuple(str(tmp_path / "images" / f"scene00{i}.png") for i in range(2))
