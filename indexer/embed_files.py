"""Embed a list of image files, outside any index: decoding in the decode pool (as an index run
does), full batches through the model in the caller's thread. For `clipdex eval`, which needs
the vectors of a dataset's images and no catalog.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.core.errors import ImageLoadError
from retrieval.core.images import load_image
from retrieval.embedding.image_models import ImageModel

from .decode import DecodeOptions, model_input_size
from .pipeline import DecodePool
from .stages import stack_pixels
from .sync import default_decode_workers

Progress = Callable[[int, int], None]  # (files done, files in all)


@dataclass(frozen=True)
class _Decoded:
    position: int
    pixels: Any = None
    reason: str | None = None


def embed_image_files(
    model: ImageModel,
    paths: Sequence[str],
    *,
    batch_size: int = 32,
    workers: int = 0,
    decode_timeout: float = 60.0,
    progress: Progress | None = None,
) -> tuple[np.ndarray, dict[int, str]]:
    """(unit vectors of the readable files in the order of `paths`, {position: reason} of the
    others). One unreadable file is reported, never fatal."""
    options = DecodeOptions().for_input_size(model_input_size(model.preprocess_cfg))

    def decode(position: int) -> _Decoded:
        try:
            loaded = load_image(paths[position], max_pixels=options.max_pixels, draft_size=options.draft_size)
            return _Decoded(position, pixels=model.preprocess(loaded.image))
        except ImageLoadError as exc:
            return _Decoded(position, reason=str(exc))
        except OSError as exc:
            return _Decoded(position, reason=exc.strerror or str(exc))
        except Exception as exc:  # one bad file never stops a run
            return _Decoded(position, reason=f"{type(exc).__name__}: {exc}"[:200])

    pool: DecodePool[int, _Decoded] = DecodePool(
        decode,
        lambda position, secs: _Decoded(position, reason=f"decoding took over {decode_timeout:g} s; skipped"),
        workers=workers or default_decode_workers(),
        max_pending=max(8, 2 * batch_size),
        timeout=decode_timeout,
    )
    vectors: dict[int, np.ndarray] = {}
    failed: dict[int, str] = {}
    batch: list[_Decoded] = []

    def flush() -> None:
        if batch:
            encoded = model.encode_images(stack_pixels([d.pixels for d in batch]))
            vectors.update((d.position, v) for d, v in zip(batch, encoded))
            batch.clear()
        if progress:
            progress(len(vectors) + len(failed), len(paths))

    with closing(pool.run(range(len(paths)))) as results:
        for result in results:
            if result.reason is not None:
                failed[result.position] = result.reason
            else:
                batch.append(result)
            if len(batch) >= batch_size:
                flush()
    flush()
    order = sorted(vectors)
    dim = int(model.signature.dim)
    out = (
        np.stack([vectors[i] for i in order]).astype(np.float32) if order else np.empty((0, dim), np.float32)
    )
    return out, failed
