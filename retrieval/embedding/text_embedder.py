"""Text to embeddings for an index: query cache, then the exported ONNX text tower, then torch.

Text queries run without torch: the index keeps its model's text tower as ONNX.

A cold `clipdex search` would spend most of its time importing torch and open_clip (seconds).
The indexer puts the model's text tower next to the catalog (exported once per model into the
user cache, where ClipModel has it loaded anyway, and copied from there into each new index);
queries then tokenize with embedding.tokenizer and run that graph with onnxruntime. The
export is only made when our tokenizer gives the model's own tokens, and the file name carries the
model's identity, so a stale graph is never used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.core.errors import ClipdexError

from .model_manifest import record_text_tower, text_export_path
from .query_cache import QueryCache
from .spec import ModelSignature

if TYPE_CHECKING:
    from .clip_model import ClipModel
    from .onnx_image_model import OnnxImageModel

TextFn = Callable[[Sequence[str]], np.ndarray]
_PROBES = ["a photo of a dog", "Ünïcode, PUNCTUATION & numbers 42!", "x " * 100]


def model_key(signature: ModelSignature) -> str:
    return signature.key()


def onnx_text_path(index_dir: Path, signature: ModelSignature) -> Path:
    return index_dir / f"text-{model_key(signature)}.onnx"


def load_onnx_text(index_dir: Path, signature: ModelSignature) -> TextFn | None:
    """An embedding function backed by the exported graph, or None if there is none to use."""
    path = onnx_text_path(index_dir, signature)
    return _text_fn(path) if path.is_file() else None


def _text_fn(path: Path) -> TextFn | None:
    """Tokenizer + ONNX Runtime session on the text tower at `path`; None when it cannot be
    used (onnxruntime missing, the file unreadable): the torch path still works then."""
    try:
        # Imported here: onnxruntime takes a while, and only a text not in the cache needs it.
        from .onnx_text_tower import OnnxTextEncoder
        from .tokenizer import default_tokenizer

        encoder = OnnxTextEncoder(path)
        tokenizer = default_tokenizer()
    except Exception:
        return None
    return lambda texts: encoder.encode(tokenizer(list(texts), encoder.context_length))


class PrefetchedText:
    """Loads the index's exported text tower in a background thread, so that onnxruntime's
    import and session set-up (C++ and file reads) overlap the caller's own start-up (catalog
    and FAISS imports) on another core. Found by file name before the catalog is even open;
    `get(signature)` hands it over only if it belongs to that model."""

    def __init__(self, index_dir: Path):
        self._result: tuple[str, TextFn] | None = None
        found = sorted(index_dir.glob("text-*.onnx"))
        self._thread = None
        if len(found) == 1:
            key = found[0].stem.removeprefix("text-")
            self._thread = threading.Thread(target=self._load, args=(found[0], key), daemon=True)
            self._thread.start()

    def _load(self, path: Path, key: str) -> None:
        fn = _text_fn(path)  # in this thread: the imports and session set-up are off the caller's path
        if fn is not None:
            self._result = (key, fn)

    def get(self, signature: ModelSignature) -> TextFn | None:
        if self._thread is None:
            return None
        self._thread.join()
        if self._result is None or self._result[0] != model_key(signature):
            return None
        return self._result[1]


def save_text_tower(index_dir: Path, model: ClipModel | OnnxImageModel) -> Path | None:
    """Put the model's text tower beside the index for fast cold queries; None when this model
    cannot use that path. Exported once per model into the user cache (this needs ClipModel's
    torch model), then copied from there into each new index, so that indexing a new folder with
    a cached model needs no torch at all (an OnnxImageModel can only copy)."""
    signature = model.signature
    path = onnx_text_path(index_dir, signature)
    cached = text_export_path(signature)
    if path.is_file():
        if not cached.is_file():
            _adopt(model, path, cached)
        return path
    if not cached.is_file():
        if not _writable(cached.parent):
            return path if _export(model, path) else None  # as before the cache: into the index
        if not _export(model, cached):
            return None
        record_text_tower(model.spec, signature, cached)
    try:
        _copy_text_tower(cached, path)
    except OSError:
        return None
    return path


def _export(model: ClipModel | OnnxImageModel, path: Path) -> bool:
    """Export `model`'s text tower to `path`; False when it cannot be (no torch model at hand,
    onnx missing, another tokenizer, the export failing). A tokenizer that is not ours is
    recorded, so that later runs know this model has no torch-free text path to wait for."""
    torch_model, tokenizer = getattr(model, "model", None), getattr(model, "tokenizer", None)
    if torch_model is None or tokenizer is None:
        return False
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it; optional: the fast path is skipped without)

        from .onnx_text_tower import export_text_tower
        from .tokenizer import default_tokenizer
    except ImportError:
        return False
    context_length = int(getattr(torch_model, "context_length", 77))
    try:
        theirs = tokenizer(_PROBES).numpy()
        mine = default_tokenizer()(_PROBES, context_length)
    except Exception:
        return False
    if theirs.shape != mine.shape or not np.array_equal(theirs, mine):
        record_text_tower(model.spec, model.signature, None)
        return False  # another tokenizer (SigLIP, HF): queries keep using the torch model
    try:
        export_text_tower(torch_model, path, context_length)
    except Exception:
        return False  # the fast path is an optimisation; indexing must not fail for it
    return True


def _adopt(model: ClipModel | OnnxImageModel, path: Path, cached: Path) -> None:
    """An index made before the cache held this model's text tower: its copy fills the cache,
    so that later runs with this model can start without torch (best effort)."""
    try:
        _copy_text_tower(path, cached)
    except OSError:
        return
    record_text_tower(model.spec, model.signature, cached)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _copy_text_tower(source: Path, target: Path) -> None:
    """Copy an exported text tower: the weights files first, the graph last, each under a
    temporary name and renamed, so that a reader never finds a graph without its weights. The
    graph names its weights file, so both keep their names (hence the same file name in the
    cache and in an index). A hard link where the file system allows: no second copy on disk."""
    from .onnx_text_tower import weight_files

    if source.name != target.name:
        raise ValueError(f"a text tower keeps its file name: {source.name} != {target.name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    for file in [*weight_files(source), source]:
        dest = target.parent / file.name
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            tmp.unlink(missing_ok=True)
            try:
                os.link(file, tmp)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(file, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


def remove_text_tower(index_dir: Path, signature: ModelSignature) -> None:
    """The exported text tower of a model the index no longer uses (after a reindex)."""
    for path in index_dir.glob(onnx_text_path(index_dir, signature).name + "*"):
        with contextlib.suppress(OSError):
            path.unlink()


class TextEmbedder:
    """Unit text embeddings for one index and its model: from the query cache, else from the
    exported ONNX text tower (no torch import), else from the torch model.

    `loaded_model()` is the model if one is loaded already (then it is used: no second model
    in memory), `load_model()` loads it."""

    def __init__(
        self,
        index_dir: Path,
        signature: ModelSignature,
        loaded_model: Callable[[], ClipModel | None],
        load_model: Callable[[], ClipModel],
        prefetched: PrefetchedText | None = None,
    ):
        self.index_dir = index_dir
        self.signature = signature
        self._loaded_model = loaded_model
        self._load_model = load_model
        self._prefetched = prefetched
        self._onnx: TextFn | None = None
        self._onnx_tried = False
        self._cache: QueryCache | None = None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts or any(not t.strip() for t in texts):
            raise ClipdexError("empty text query")
        if self._cache is None:
            self._cache = QueryCache(self.index_dir, model_key(self.signature))
        dim = self.signature.dim
        out = np.empty((len(texts), dim), dtype=np.float32)
        todo = []
        for i, text in enumerate(texts):
            cached = self._cache.get(text)
            if cached is not None and cached.shape == (dim,):
                out[i] = cached
            else:
                todo.append(i)
        if todo:
            fresh = self._encode([texts[i] for i in todo])
            for i, vec in zip(todo, fresh):
                out[i] = vec
                self._cache.put(texts[i], vec)
        return out

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        model = self._loaded_model()
        if model is None and not self._onnx_tried:
            self._onnx_tried = True
            if self._prefetched is not None:
                self._onnx = self._prefetched.get(self.signature)
            if self._onnx is None:
                self._onnx = load_onnx_text(self.index_dir, self.signature)
        if model is None and self._onnx is not None:
            return self._onnx(texts)
        return (model or self._load_model()).encode_texts(texts)

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None
