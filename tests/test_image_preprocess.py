"""The torch-free preprocessing (embedding.image_preprocess) gives open_clip's numbers exactly.

The reference is open_clip's own eval transform (image_transform_v2, is_train=False) for the same
PreprocessCfg, on pictures of many sizes, aspect ratios and modes; the configurations are the
ones the models in use have (read from open_clip) and variations of each option.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
from conftest import make_scene
from PIL import Image

# (width, height): tiny, thin both ways, odd, exactly the input, just off it, camera-like.
SIZES = [
    (1, 1), (4, 90), (90, 4), (17, 31), (64, 64), (63, 65), (65, 63), (64, 100), (100, 64),
    (224, 224), (225, 224), (256, 256), (257, 255), (300, 224), (500, 375), (375, 500),
    (1000, 999), (504, 378), (756, 1008),
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """torchvision's normalise on tiny tensors: a pool of threads only waits on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model_cfgs() -> dict[str, dict]:
    """Preprocessing of the models clipdex is tested and benchmarked with, as open_clip builds it."""
    import open_clip
    from open_clip.transform import PreprocessCfg

    from retrieval.embedding.spec import CONFIG_DIR

    open_clip.add_model_config(CONFIG_DIR)
    cfgs = {}
    for arch in ("clipdex-tiny", "ViT-B-32-256"):
        size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
        cfgs[arch] = asdict(PreprocessCfg(size=size))  # random weights or a checkpoint file
    tag = open_clip.get_pretrained_cfg("ViT-B-32-256", "datacomp_s34b_b86k")  # rclip's weights
    keys = ("mean", "std", "interpolation", "resize_mode")
    cfgs["ViT-B-32-256/datacomp"] = {**cfgs["ViT-B-32-256"], **{k: tag[k] for k in keys if k in tag}}
    return cfgs


def _variants() -> dict[str, dict]:
    from open_clip.transform import PreprocessCfg

    base = asdict(PreprocessCfg(size=224))
    return {
        "bilinear": {**base, "interpolation": "bilinear"},
        "squash": {**base, "resize_mode": "squash"},
        "squash-bilinear": {**base, "resize_mode": "squash", "interpolation": "bilinear"},
        "longest": {**base, "resize_mode": "longest"},
        "longest-fill": {**base, "resize_mode": "longest", "fill_color": 128},
        "non-square": {**base, "size": (224, 160)},
        "non-square-bilinear": {**base, "size": (160, 224), "interpolation": "bilinear"},
        "non-square-longest": {**base, "size": (96, 128), "resize_mode": "longest"},
        "half-mean": {**base, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    }


def _pictures() -> list[Image.Image]:
    rng = np.random.default_rng(10)
    out = []
    for i, (w, h) in enumerate(SIZES):
        out.append(make_scene(i, (w, h)) if min(w, h) >= 8 else Image.new("RGB", (w, h), (200, 10, 90)))
        noise = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)  # every pixel different: no flat areas
        out.append(Image.fromarray(noise[:, :, :3], "RGB"))
        if i % 3 == 0:  # open_clip resizes in the image's own mode and converts to RGB after the crop
            out.append(Image.fromarray(noise[:, :, 0], "L"))
            out.append(Image.fromarray(noise, "RGBA"))
    return out


def _check_equal(cfg: dict) -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from retrieval.embedding.image_preprocess import ImagePreprocess

    reference = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    mine = ImagePreprocess.from_cfg(cfg)
    for picture in _pictures():
        try:
            want = reference(picture).numpy()
        except ValueError:  # e.g. a side rounded to 0 pixels: then this file fails either way
            with pytest.raises(ValueError):
                mine(picture)
            continue
        got = mine(picture)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        assert got.shape == want.shape, (picture.size, picture.mode)
        diff = float(np.abs(got - want).max())
        assert diff <= 1e-6, (picture.size, picture.mode, diff)


@pytest.mark.parametrize("name", ["clipdex-tiny", "ViT-B-32-256", "ViT-B-32-256/datacomp"])
def test_equal_to_open_clip_for_the_models_in_use(name):
    _check_equal(_model_cfgs()[name])


@pytest.mark.parametrize("name", list(_variants()))
def test_equal_to_open_clip_for_each_option(name):
    _check_equal(_variants()[name])


def test_equal_to_the_loaded_models_own_transform(tiny_clip_model, scene):
    """What ClipModel actually uses (its model's preprocess_cfg), not a reconstruction of it."""
    from retrieval.embedding.image_preprocess import ImagePreprocess

    mine = ImagePreprocess.from_cfg(dict(tiny_clip_model.model.visual.preprocess_cfg))
    for seed, size in enumerate([(96, 72), (72, 128), (64, 64), (640, 480)]):
        picture = scene(seed, size)
        np.testing.assert_array_equal(mine(picture), tiny_clip_model.preprocess(picture).numpy())


@pytest.mark.parametrize(
    "cfg",
    [
        {"size": 224, "resize_mode": "stretch"},
        {"size": 224, "mode": "L"},
        {"size": (224, 224, 3)},
        {"size": 224, "std": (0.5, 0.0, 0.5)},
        {"size": 224, "mean": (0.5, 0.5)},
    ],
)
def test_refuses_what_it_would_not_reproduce(cfg):
    from retrieval.embedding.image_preprocess import ImagePreprocess, UnsupportedPreprocess

    with pytest.raises(UnsupportedPreprocess):
        ImagePreprocess.from_cfg(cfg)
