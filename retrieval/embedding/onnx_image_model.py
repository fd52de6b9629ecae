"""A model's image side without torch: its cached ONNX image tower and numpy preprocessing.

What an index run needs from ClipModel (spec, signature, preprocess, encode_images, warm_up),
built from a ModelManifest: importing torch and open_clip and building the model cost an index
run seconds and over a gigabyte of memory, and with the export cached it needs neither. Images
only: a run that must export something (a text tower for a new index that the cache lacks) uses
ClipModel, see image_models.load_image_model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.core.errors import ModelLoadError

from .image_preprocess import ImagePreprocess
from .image_towers import open_image_tower
from .model_manifest import ModelManifest
from .spec import ModelSignature, ModelSpec, loadable_pretrained

if TYPE_CHECKING:
    from PIL import Image


class OnnxImageModel:
    """Unit-norm float32 image embeddings from a cached ONNX export, equal to ClipModel's on the
    onnx backend (the same graph, the same session options, the same preprocessing numbers)."""

    device = "cpu"

    def __init__(
        self, spec: ModelSpec, manifest: ModelManifest, backend: str = "onnx", precision: str = "fp32"
    ):
        self.spec = spec
        self.backend = backend  # onnx (fp32, int8) or openvino (fp32, bf16), as devices.py chose
        self.precision = precision
        self.manifest = manifest
        recorded = manifest.signature
        # Where the weights lie is this run's business (ClipModel records its own spec's path too).
        self._signature = ModelSignature(
            **{**recorded.to_dict(), "pretrained": loadable_pretrained(spec.pretrained), "seed": spec.seed}
        )
        self.dim = recorded.dim
        self.preprocess_cfg: dict[str, Any] = dict(recorded.preprocess)  # as ClipModel.preprocess_cfg
        self.preprocess = ImagePreprocess.from_cfg(manifest.preprocess_cfg)
        self.logit_scale = recorded.logit_scale
        self.logit_bias = recorded.logit_bias
        self.images_encoded = 0  # counted like ClipModel's, so tests can prove what was embedded
        self.max_batch: int | None = None
        self._encoder: Any = None  # the session (OnnxImageEncoder or OpenVinoImageEncoder), made on first use

    @property
    def signature(self) -> ModelSignature:
        return self._signature

    def warm_up(self) -> None:
        """Open the ONNX Runtime session (a fraction of a second) before timing starts."""
        self._session()

    def _session(self) -> Any:
        if self._encoder is None:
            try:
                encoder = open_image_tower(self.manifest.image_onnx, self.backend, self.precision)
            except Exception as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ModelLoadError(f"cannot open {self.manifest.image_onnx}: {reason}") from None
            shape = encoder.image_size
            if encoder.dim != self.dim or (shape is not None and shape != self.manifest.image_size):
                raise ModelLoadError(
                    f"{self.manifest.image_onnx} does not fit its manifest (dim {encoder.dim}, input "
                    f"{shape}); delete it to have it exported again"
                )
            self._encoder = encoder
        return self._encoder

    def encode_images(self, pixels: Any) -> np.ndarray:
        """Embed a batch of preprocessed images (N, 3, H, W): numpy (or anything np.asarray takes)."""
        x = np.asarray(pixels, dtype=np.float32)
        if x.shape[0] == 0:
            return np.empty((0, self.dim), np.float32)
        vectors = self._session().encode(x)
        self.images_encoded += int(x.shape[0])
        return vectors

    def encode_pil(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.empty((0, self.dim), np.float32)
        return self.encode_images(np.stack([self.preprocess(im) for im in images]))
