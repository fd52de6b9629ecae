"""open_clip's evaluation transform in PIL + numpy: pixels for the model without torch.

open_clip (image_transform_v2 with is_train=False) resizes with torchvision on PIL images, then
crops, converts to RGB, scales to [0, 1] and normalises in float32. Each of those steps is PIL
or IEEE float32 arithmetic, so doing the same steps in the same order gives the same numbers,
bit for bit (tests/test_image_preprocess.py compares them): an index built by either path can be
extended by the other. The order matters: the resize runs in the image's own mode and the RGB
conversion comes after the crop, as in open_clip.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from retrieval.core.errors import ModelLoadError

RESIZE_MODES = ("shortest", "squash", "longest")
_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults, for a cfg that omits them
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class UnsupportedPreprocess(ModelLoadError):
    """A preprocessing configuration this module does not reproduce (the torch path still does)."""


@dataclass(frozen=True)
class ImagePreprocess:
    """PIL image -> float32 (3, H, W), equal to open_clip's eval transform for the same cfg."""

    size: tuple[int, int]  # (height, width) of the model's input
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> ImagePreprocess:
        """From an open_clip PreprocessCfg as a dict (model.visual.preprocess_cfg)."""
        size = cfg.get("size", 224)
        hw = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
        mode = cfg.get("mode", "RGB")
        resize_mode = cfg.get("resize_mode") or "shortest"
        # open_clip maps anything but 'bilinear' to bicubic ('random' included) at inference.
        interpolation = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
        mean, std = _triple(cfg.get("mean") or _OPENAI_MEAN), _triple(cfg.get("std") or _OPENAI_STD)
        if len(hw) != 2 or mode != "RGB" or resize_mode not in RESIZE_MODES or 0.0 in std:
            raise UnsupportedPreprocess(f"no torch-free preprocessing for {dict(cfg)}")
        fill = cfg.get("fill_color", 0)
        if not isinstance(fill, int):
            raise UnsupportedPreprocess(f"no torch-free preprocessing for fill_color {fill!r}")
        return cls((hw[0], hw[1]), mean, std, interpolation, resize_mode, fill)

    def __call__(self, image: Image.Image) -> np.ndarray:
        if self.resize_mode == "squash":
            image = _resize(image, self.size, self._filter)
        elif self.resize_mode == "longest":
            image = _resize(image, self._keep_ratio(image, longest=True), self._filter)
            image = _center_crop(image, self.size, self.fill_color)
        else:
            image = _resize(image, self._shortest_size(image), self._shortest_filter)
            image = _center_crop(image, self.size, 0)
        return self._to_array(image.convert("RGB"))

    @property
    def _filter(self) -> Image.Resampling:
        return _FILTERS[self.interpolation]

    @property
    def _shortest_filter(self) -> Image.Resampling:
        # open_clip passes no interpolation to ResizeKeepRatio for a non-square 'shortest' target,
        # so that case resizes bicubic whatever the cfg says.
        return self._filter if self.size[0] == self.size[1] else Image.Resampling.BICUBIC

    def _shortest_size(self, image: Image.Image) -> tuple[int, int]:
        if self.size[0] != self.size[1]:
            return self._keep_ratio(image, longest=False)
        # torchvision's Resize(int): the short side to `size`, the long side truncated (not rounded).
        w, h = image.size
        target = self.size[0]
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(target * long / short)
        return (new_long, target) if w <= h else (target, new_long)

    def _keep_ratio(self, image: Image.Image, *, longest: bool) -> tuple[int, int]:
        """open_clip's ResizeKeepRatio (timm's) without its random parts, as (height, width)."""
        w, h = image.size
        ratio_h, ratio_w = h / self.size[0], w / self.size[1]
        ratio = max(ratio_h, ratio_w) if longest else min(ratio_h, ratio_w)
        return (round(h / ratio), round(w / ratio))

    def _to_array(self, image: Image.Image) -> np.ndarray:
        # The same float32 operations as torchvision's to_tensor (x / 255) and Normalize
        # ((x - mean) / std), in the same order: identical results, not merely close ones.
        x = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32, order="C")
        x /= np.float32(255)
        x -= np.asarray(self.mean, np.float32)[:, None, None]
        x /= np.asarray(self.std, np.float32)[:, None, None]
        return x


def _triple(values: Any) -> tuple[float, float, float]:
    v = [float(x) for x in values] if isinstance(values, (list, tuple)) else [float(values)] * 3
    if len(v) != 3:
        raise UnsupportedPreprocess(f"expected 3 channel values, got {values!r}")
    return (v[0], v[1], v[2])


def _resize(image: Image.Image, size_hw: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    if (image.height, image.width) == size_hw:
        return image  # torchvision skips the resize too (a same-size PIL resize is not a no-op)
    return image.resize((size_hw[1], size_hw[0]), resample)


def _center_crop(image: Image.Image, size_hw: tuple[int, int], fill: int) -> Image.Image:
    """torchvision's center_crop / open_clip's center_crop_or_pad: pad (left/top get the smaller
    half) where the image is smaller, then crop at round((extent - crop) / 2)."""
    crop_h, crop_w = size_hw
    if crop_w > image.width or crop_h > image.height:
        pad_w, pad_h = max(crop_w - image.width, 0), max(crop_h - image.height, 0)
        padded = Image.new(image.mode, (image.width + pad_w, image.height + pad_h), _fill(image, fill))
        padded.paste(image, (pad_w // 2, pad_h // 2))
        image = padded
        if image.size == (crop_w, crop_h):
            return image
    top = int(round((image.height - crop_h) / 2.0))
    left = int(round((image.width - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


def _fill(image: Image.Image, fill: int) -> int | tuple[int, ...]:
    bands = len(image.getbands())
    return fill if bands == 1 else (fill,) * bands
