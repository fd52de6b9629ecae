"""The CLIP model: load (pretrained tag, local checkpoint, or seeded random weights), encode.

torch and open_clip are imported inside functions: they take seconds to import, and a query
answered from cached embeddings never needs them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.core.errors import ModelLoadError

from .devices import resolve_backend, resolve_device, resolve_precision
from .image_towers import open_image_tower
from .model_manifest import image_export_path, write_manifest
from .onnx_image_tower import export_image_tower
from .spec import (
    CONFIG_DIR,
    RANDOM,
    ModelSignature,
    ModelSpec,
    check_arch,
    checkpoint_path,
    loadable_pretrained,
    register_config,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image


class ClipModel:
    """An open_clip model ready to embed images and texts into unit-norm float32 vectors."""

    def __init__(self, spec: ModelSpec):
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        self.spec = spec
        self.arch = register_config(spec.arch)
        self.device = resolve_device(spec.device)
        self.precision = resolve_precision(spec.precision, self.device)
        self.backend = resolve_backend(spec.backend, self.device, self.precision)
        self.model = _create(self.arch, spec)
        # Read before any half() so that the recorded values do not depend on the precision.
        self.logit_scale = float(self.model.logit_scale.detach().float().exp().item())
        bias = getattr(self.model, "logit_bias", None)
        self.logit_bias: float | None = None if bias is None else float(bias.detach().float().item())
        self.model.eval().to(self.device)
        if self.precision == "fp16":
            self.model.half()
        self._bf16_images = None  # a bfloat16 copy of the model for images on the CPU (see _bf16_copy)
        if self.precision == "bf16" and self.backend == "torch" and not self.device.startswith("cuda"):
            self._bf16_copy()
        cfg = dict(self.model.visual.preprocess_cfg)
        self.preprocess_cfg = {
            "size": list(cfg["size"]) if isinstance(cfg.get("size"), (list, tuple)) else cfg.get("size"),
            "mean": list(cfg.get("mean", ())),
            "std": list(cfg.get("std", ())),
            "interpolation": cfg.get("interpolation"),
            "resize_mode": cfg.get("resize_mode"),
        }
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.preprocess: Callable[[Image.Image], torch.Tensor] = image_transform_v2(
            PreprocessCfg(**cfg), is_train=False
        )
        self.tokenizer = open_clip.get_tokenizer(self.arch)
        self.dim = (
            int(self.model.text_projection.shape[-1])
            if hasattr(self.model, "text_projection") and self.model.text_projection is not None
            else int(self._probe_dim())
        )
        self.images_encoded = 0  # counted so tests can prove that skipped files were not embedded
        self.texts_encoded = 0
        self.max_batch: int | None = None  # lowered after a CUDA out-of-memory error
        self._onnx_images = None  # OnnxImageEncoder (or OpenVinoImageEncoder), made on first use

    def _probe_dim(self) -> int:
        return int(self.encode_texts(["x"]).shape[1])

    @property
    def signature(self) -> ModelSignature:
        return ModelSignature(
            arch=self.arch,
            weights_id=self.spec.weights_id(),
            pretrained=loadable_pretrained(self.spec.pretrained),
            dim=self.dim,
            preprocess=self.preprocess_cfg,
            seed=self.spec.seed,
            logit_scale=self.logit_scale,
            logit_bias=self.logit_bias,
        )

    def _bf16_copy(self) -> None:
        """bfloat16 images on the CPU from a converted copy of the model: torch's autocast measured
        slower than float32 there, converted weights 2-3x faster (bench/encode_options.py --suite
        precision). A copy, so that self.model stays float32: the ONNX exports cached for every
        precision are made from it, and texts stay exact."""
        import copy

        import torch

        self._bf16_images = copy.deepcopy(self.model).to(torch.bfloat16).eval()

    def _autocast(self):  # type: ignore[no-untyped-def]
        import torch

        # Autocast on CUDA only: on the CPU bf16 images use the converted copy, and texts (few,
        # and on ONNX Runtime at query time) stay float32 there.
        if self.precision == "bf16" and self.backend == "torch" and self.device.startswith("cuda"):
            return torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """Embed a batch of preprocessed images (N, 3, H, W)."""
        import torch

        n = int(pixels.shape[0])
        if n == 0:
            return np.empty((0, self.dim), np.float32)
        if self.backend in ("onnx", "openvino"):
            encoder = self._onnx_image_encoder()
            if encoder is not None:
                self.images_encoded += n
                return encoder.encode(pixels.numpy())
        if self.max_batch and n > self.max_batch:
            # One step for the whole split: a part that runs out of memory lowers max_batch, and
            # slicing with the lowered value would skip the images between.
            step = self.max_batch
            return np.concatenate([self.encode_images(pixels[i : i + step]) for i in range(0, n, step)])
        try:
            with torch.inference_mode(), self._autocast():
                x = pixels
                if self.device.startswith("cuda"):
                    x = x.pin_memory().to(self.device, non_blocking=True)
                if self.precision == "fp16":
                    x = x.half()
                if self._bf16_images is not None:
                    feats = self._bf16_images.encode_image(x.to(torch.bfloat16))
                else:
                    feats = self.model.encode_image(x)
        except torch.cuda.OutOfMemoryError:
            if n == 1:
                raise
            torch.cuda.empty_cache()
            self.max_batch = max(1, n // 2)  # remember: later batches go in halves straight away
            return self.encode_images(pixels)
        self.images_encoded += n
        return _normalize(feats)

    def warm_up(self) -> None:
        """Do one-time work (the ONNX export, on first use of a model) before timing starts."""
        if self.backend in ("onnx", "openvino"):
            self._onnx_image_encoder()

    def _onnx_image_encoder(self):  # type: ignore[no-untyped-def]
        """The exported image tower (once per model, in the user cache), or None if export
        fails: then torch does the work."""
        if self._onnx_images is None:
            path = image_export_path(self.signature)
            try:
                if not path.is_file():
                    size = self.preprocess_cfg["size"]
                    export_image_tower(self.model, path, size[0] if isinstance(size, list) else size)
                self._onnx_images = self._open_image_tower(path)
            except Exception as exc:
                if self.precision == "int8":  # torch has no int8 to fall back on
                    raise ModelLoadError(f"cannot make the int8 image tower: {_first_line(exc)}") from None
                self._fall_back_to_torch()
                return None
            self._save_manifest()
        return self._onnx_images

    def _open_image_tower(self, path: Path):  # type: ignore[no-untyped-def]
        """A session on the float32 export at `path` in this model's backend and precision."""
        return open_image_tower(path, self.backend, self.precision)

    def _fall_back_to_torch(self) -> None:
        self.backend = "torch"
        if self.precision == "bf16" and not self.device.startswith("cuda"):
            self._bf16_copy()

    def _save_manifest(self) -> None:
        """Describe the cached export so that later runs can use it without torch (model_manifest).
        Only for a square input: the export traces a square image (see _onnx_image_encoder)."""
        size = self.preprocess_cfg["size"]
        side = size if isinstance(size, int) else size[0]
        if isinstance(size, list) and len(set(size)) != 1:
            return
        with contextlib.suppress(OSError, ModelLoadError):  # best effort: without it, runs start slower
            write_manifest(self.spec, self.signature, dict(self.model.visual.preprocess_cfg), (side, side))

    def encode_pil(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        return self.encode_images(torch.stack([self.preprocess(im) for im in images]))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        if not texts:
            return np.empty((0, self.dim), np.float32)
        with torch.inference_mode(), self._autocast():
            tokens = self.tokenizer(list(texts)).to(self.device)
            feats = self.model.encode_text(tokens)
        self.texts_encoded += len(texts)
        return _normalize(feats)


def _normalize(feats: torch.Tensor) -> np.ndarray:
    v = feats.float().cpu().numpy().astype(np.float32, copy=False)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return (v / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def _create(arch: str, spec: ModelSpec):  # type: ignore[no-untyped-def]
    import open_clip
    import torch

    check_arch(arch)
    if spec.pretrained == RANDOM:
        # Seed, so that two processes building the same random model get the same weights.
        state = torch.random.get_rng_state()
        torch.manual_seed(spec.seed)
        try:
            with _quiet_logging():
                return open_clip.create_model(arch, pretrained=None, pretrained_text=False)
        finally:
            torch.random.set_rng_state(state)
    path = checkpoint_path(spec.pretrained)
    if path is not None:
        with _quiet_logging():
            model = open_clip.create_model(arch, pretrained=None, pretrained_text=False)
        try:
            open_clip.load_checkpoint(model, str(path), weights_only=True)
        except Exception as exc:
            raise ModelLoadError(f"cannot load checkpoint {path} into {arch}: {_first_line(exc)}") from None
        return model
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if spec.pretrained not in tags:
        raise ModelLoadError(
            f"'{spec.pretrained}' is neither a pretrained tag of {arch} ({', '.join(tags) or 'none'}) "
            "nor a checkpoint file"
        )
    tag_cfg = open_clip.get_pretrained_cfg(arch, spec.pretrained)
    preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    cached = _cached_weights(tag_cfg)
    if cached is None and not _hub_reachable():
        raise ModelLoadError(
            f"cannot download weights {arch}/{spec.pretrained}: the Hugging Face hub is unreachable; "
            "download open_clip_pytorch_model.bin elsewhere and pass it with --pretrained /path/to/file"
        )
    with _quiet_logging():
        try:
            if cached is not None:  # no network round trip (and no retries) for a cached file
                model = open_clip.create_model(
                    arch, pretrained=None, pretrained_text=False, force_preprocess_cfg=preprocess
                )
                open_clip.load_checkpoint(model, cached, weights_only=True)
                return model
            return open_clip.create_model(arch, pretrained=spec.pretrained, pretrained_text=False)
        except Exception as exc:
            raise ModelLoadError(
                f"cannot get weights {arch}/{spec.pretrained} ({_first_line(exc)[:120]}); offline, "
                "pass a downloaded checkpoint with --pretrained /path/to/file"
            ) from None


def _cached_weights(tag_cfg: dict[str, Any]) -> str | None:
    """The tag's checkpoint in the Hugging Face cache, if it was downloaded before."""
    repo = (tag_cfg.get("hf_hub") or "").strip("/")
    if not repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


# A proxy's own answers when it could not reach the upstream host: no path to the hub.
_GATEWAY_FAILURES = frozenset({502, 504})


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick HEAD of the hub, so that an offline machine fails in seconds, not after minutes of
    retries. urllib goes through HTTPS_PROXY / HTTP_PROXY and honours NO_PROXY, as the download
    itself will (a raw socket to the hub would call a machine behind a proxy offline). Any HTTP
    answer, even 4xx, means the hub can be reached, except a proxy's 502/504 (it could not reach
    the hub itself); connection errors, refused tunnels and timeouts mean not."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    request = urllib.request.Request(endpoint, method="HEAD")
    # A fresh opener: urlopen's shared one keeps the proxy settings of the process's first call.
    opener = urllib.request.build_opener()
    try:
        with opener.open(request, timeout=timeout):
            return True
    except urllib.error.HTTPError as exc:
        if exc.fp is not None:
            exc.close()
        return exc.code not in _GATEWAY_FAILURES
    except (OSError, ValueError):  # URLError is an OSError; ValueError: a malformed HF_ENDPOINT
        return False


class _quiet_logging:
    """open_clip and huggingface_hub log each retry; the caller reports one line instead."""

    def __enter__(self) -> None:
        logging.disable(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.disable(logging.NOTSET)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
