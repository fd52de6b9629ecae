"""What a later process needs to use a model's cached ONNX exports without torch or open_clip.

ClipModel exports the image tower into the user cache (onnx/image-<signature key>.onnx) the first
time it runs a model on ONNX Runtime, and the indexer caches the text tower beside it
(onnx/text-<signature key>.onnx). The signature key needs the loaded model (dim, preprocessing),
so a process without the model cannot find those files by itself: this manifest,
onnx/model-<spec key>.json, is found from the ModelSpec alone (the architecture name and
spec.weights_id(), both computed without torch) and holds the rest: the model's signature, its
preprocessing and the names of the exports.

A manifest is only trusted when it names the very weights asked for (its architecture and
weights_id are checked against the spec's, not just its file name) and its image export exists.
Writes are atomic (temp file + rename); two processes writing at once write the same facts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .image_preprocess import ImagePreprocess, UnsupportedPreprocess
from .spec import ModelSignature, ModelSpec, cache_dir

MANIFEST_VERSION = 1
_TEXT = "text_onnx"  # absent: not known yet; null: the model has no torch-free text tower


def onnx_cache_dir() -> Path:
    return cache_dir() / "onnx"


def image_export_path(signature: ModelSignature) -> Path:
    return onnx_cache_dir() / f"image-{signature.key()}.onnx"


def text_export_path(signature: ModelSignature) -> Path:
    # The same name as in an index folder (text_embedder.onnx_text_path), so the weights file
    # that the graph names beside itself keeps its name when both are copied into an index.
    return onnx_cache_dir() / f"text-{signature.key()}.onnx"


def spec_key(spec: ModelSpec) -> str | None:
    """The manifest's key, from what a spec gives without torch; None where that is not enough
    (an architecture given as a .json config path needs open_clip to be named)."""
    if spec.arch.endswith(".json"):
        return None
    identity = [spec.arch, spec.weights_id()]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def manifest_path(spec: ModelSpec) -> Path | None:
    key = spec_key(spec)
    return None if key is None else onnx_cache_dir() / f"model-{key}.json"


@dataclass(frozen=True)
class ModelManifest:
    signature: ModelSignature  # as ClipModel reported it; `pretrained` is the writer's
    preprocess_cfg: dict[str, Any]  # open_clip's full PreprocessCfg (fill_color included)
    image_size: tuple[int, int]  # (height, width) of the exported graph's input
    image_onnx: Path
    text_onnx: Path | None  # None: no cached text tower (see text_known)
    text_known: bool  # False: nobody has tried to cache the text tower yet

    @property
    def usable_without_torch(self) -> bool:
        """An index run needs nothing else: the image tower, and the text tower (or the
        knowledge that this model has none to offer) for a new index."""
        return (
            self.image_onnx.is_file()
            and self.text_known
            and (self.text_onnx is None or self.text_onnx.is_file())
        )


def read_manifest(spec: ModelSpec) -> ModelManifest | None:
    """The manifest for exactly these weights, or None (none, unreadable, or another model's)."""
    path = manifest_path(spec)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("version") != MANIFEST_VERSION:
            return None
        signature = ModelSignature.from_dict(data["signature"])
        if (signature.arch, signature.weights_id) != (spec.arch, spec.weights_id()):
            return None  # another model's manifest under this name: never use it
        image = onnx_cache_dir() / str(data["image_onnx"])
        if image != image_export_path(signature):
            return None  # names a file that is not this signature's export
        size = tuple(int(s) for s in data["image_size"])
        cfg = dict(data["preprocess_cfg"])
        ImagePreprocess.from_cfg(cfg)  # refuses a configuration it would not reproduce
        text = data.get(_TEXT)
        text_path = None if text is None else onnx_cache_dir() / str(text)
        if text_path is not None and text_path != text_export_path(signature):
            return None
    except (OSError, ValueError, KeyError, TypeError, UnsupportedPreprocess):
        return None
    if len(size) != 2:
        return None
    return ModelManifest(signature, cfg, (size[0], size[1]), image, text_path, _TEXT in data)


def write_manifest(
    spec: ModelSpec, signature: ModelSignature, preprocess_cfg: Mapping[str, Any], image_size: tuple[int, int]
) -> None:
    """Record the image export of `signature` (best effort: without a manifest a run only
    starts slower). Keeps what an earlier write learnt about the text tower."""
    path = manifest_path(spec)
    if path is None or (signature.arch, signature.weights_id) != (spec.arch, spec.weights_id()):
        return
    try:
        ImagePreprocess.from_cfg(preprocess_cfg)
    except UnsupportedPreprocess:
        return  # a lean process could not preprocess for this model: it keeps using torch
    data = _read_json(path)
    new = {
        "version": MANIFEST_VERSION,
        "signature": _plain(signature.to_dict()),
        "preprocess_cfg": _plain(dict(preprocess_cfg)),
        "image_size": list(image_size),
        "image_onnx": image_export_path(signature).name,
    }
    if _same_model(data, signature) and _TEXT in data:
        new[_TEXT] = data[_TEXT]
    if {k: data.get(k) for k in new} != new or set(data) - set(new):
        _write_json(path, new)


def record_text_tower(spec: ModelSpec, signature: ModelSignature, text_onnx: Path | None) -> None:
    """Note the cached text tower (or, with None, that the model has none) in the manifest of the
    image export; nothing when there is no such manifest."""
    path = manifest_path(spec)
    if path is None:
        return
    data = _read_json(path)
    if not _same_model(data, signature):
        return
    value = None if text_onnx is None else text_onnx.name
    if _TEXT not in data or data[_TEXT] != value:
        _write_json(path, {**data, _TEXT: value})


def _same_model(data: dict[str, Any], signature: ModelSignature) -> bool:
    """Whether a manifest's contents describe `signature`'s model (wherever its weights file lies)."""
    try:
        return ModelSignature.from_dict(data["signature"]).matches(signature)
    except (KeyError, TypeError, AttributeError):
        return False


def _plain(value: Any) -> Any:
    """JSON's own types (tuples become lists), so that a written manifest compares equal to a read one."""
    return json.loads(json.dumps(value))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
