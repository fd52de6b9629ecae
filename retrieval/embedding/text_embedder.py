"""Text to embeddings for an index: query cache, then the exported ONNX text tower, then torch.

Text queries run without torch: the index keeps its model's text tower as ONNX.

A cold `clipdex search` would spend most of its time importing torch and open_clip (seconds).
When the indexer has the model loaded anyway, it exports the text tower next to the catalog;
queries then tokenize with embedding.tokenizer and run that graph with onnxruntime. The
export is only made when our tokenizer gives the model's own tokens, and the file name carries the
model's identity, so a stale graph is never used.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.core.errors import ClipdexError

from .query_cache import QueryCache
from .spec import ModelSignature

if TYPE_CHECKING:
    from .clip_model import ClipModel

TextFn = Callable[[Sequence[str]], np.ndarray]
_PROBES = ["a photo of a dog", "Ünïcode, PUNCTUATION & numbers 42!", "x " * 100]


def model_key(signature: ModelSignature) -> str:
    return signature.key()


def onnx_text_path(index_dir: Path, signature: ModelSignature) -> Path:
    return index_dir / f"text-{model_key(signature)}.onnx"


def load_onnx_text(index_dir: Path, signature: ModelSignature) -> TextFn | None:
    """An embedding function backed by the exported graph, or None if there is none to use."""
    path = onnx_text_path(index_dir, signature)
    if not path.is_file():
        return None
    try:
        # Imported here: onnxruntime takes a while, and only a text not in the cache needs it.
        from .onnx_text_tower import OnnxTextEncoder
        from .tokenizer import default_tokenizer

        encoder = OnnxTextEncoder(path)
    except Exception:  # onnxruntime missing or the file unreadable: the torch path still works
        return None
    tokenizer = default_tokenizer()
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
        try:
            from .onnx_text_tower import OnnxTextEncoder  # in this thread: off the caller's path
            from .tokenizer import default_tokenizer

            encoder = OnnxTextEncoder(path)
            tokenizer = default_tokenizer()
        except Exception:
            return
        self._result = (key, lambda texts: encoder.encode(tokenizer(list(texts), encoder.context_length)))

    def get(self, signature: ModelSignature) -> TextFn | None:
        if self._thread is None:
            return None
        self._thread.join()
        if self._result is None or self._result[0] != model_key(signature):
            return None
        return self._result[1]


def save_text_tower(index_dir: Path, clip: ClipModel) -> Path | None:
    """Export `clip`'s text tower for fast queries; None when this model cannot use that path."""
    path = onnx_text_path(index_dir, clip.signature)
    if path.is_file():
        return path
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it; optional: the fast path is skipped without)

        from .onnx_text_tower import export_text_tower
        from .tokenizer import default_tokenizer
    except ImportError:
        return None
    context_length = int(getattr(clip.model, "context_length", 77))
    try:
        theirs = clip.tokenizer(_PROBES).numpy()
        mine = default_tokenizer()(_PROBES, context_length)
    except Exception:
        return None
    if theirs.shape != mine.shape or not np.array_equal(theirs, mine):
        return None  # another tokenizer (SigLIP, HF): queries keep using the torch model
    try:
        export_text_tower(clip.model, path, context_length)
    except Exception:
        return None  # the fast path is an optimisation; indexing must not fail for it
    return path


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
