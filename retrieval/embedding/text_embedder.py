"""Text queries without torch: the index keeps its model's text tower as ONNX.

A cold `clipdex search` would spend most of its time importing torch and open_clip (seconds).
When the indexer has the model loaded anyway, it exports the text tower next to the catalog;
queries then tokenize with retrieval.embedding.tokenizer and run that graph with onnxruntime. The export
is only made when our tokenizer gives the model's own tokens, and the file name carries the
model's identity, so a stale graph is never used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.embedding.clip_model import ModelSignature

if TYPE_CHECKING:
    from retrieval.embedding.clip_model import ClipModel

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
        from retrieval.embedding.onnx_text_tower import OnnxTextEncoder
        from retrieval.embedding.tokenizer import default_tokenizer

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
        import threading

        self._result: tuple[str, TextFn] | None = None
        found = sorted(index_dir.glob("text-*.onnx"))
        self._thread = None
        if len(found) == 1:
            key = found[0].stem.removeprefix("text-")
            self._thread = threading.Thread(target=self._load, args=(found[0], key), daemon=True)
            self._thread.start()

    def _load(self, path: Path, key: str) -> None:
        try:
            from retrieval.embedding.onnx_text_tower import OnnxTextEncoder
            from retrieval.embedding.tokenizer import default_tokenizer

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


def export_onnx_text(index_dir: Path, clip: ClipModel) -> Path | None:
    """Export `clip`'s text tower for fast queries; None when this model cannot use that path."""
    path = onnx_text_path(index_dir, clip.signature)
    if path.is_file():
        return path
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)

        from retrieval.embedding.onnx_text_tower import export_text_tower
        from retrieval.embedding.tokenizer import default_tokenizer
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
