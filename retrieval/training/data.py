"""Image-caption pairs for training: decoded and augmented in DataLoader workers.

Every random choice of a sample (which of its image's captions, the crop) is seeded from (seed,
epoch, image), and the order of an epoch from (seed, epoch): a batch depends only on where it
falls in the run, so a run resumed after a kill sees the very batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from retrieval.core.errors import ImageLoadError
from retrieval.core.images import load_image
from retrieval.evaluation.datasets import CaptionSet

Transform = Callable[[Any], torch.Tensor]
Tokenize = Callable[[Sequence[str]], torch.Tensor]


class PairDataset(Dataset):
    """Item i: image i through `transform` and the tokens of one of its captions (chosen per
    epoch), or None when the image cannot be read (dropped by `collate`)."""

    def __init__(
        self, pairs: CaptionSet, transform: Transform, tokenize: Tokenize, seed: int, draft_size: int
    ):
        self.images = pairs.images
        self.captions = pairs.captions
        order = np.argsort(pairs.caption_image, kind="stable")
        bounds = np.searchsorted(pairs.caption_image[order], np.arange(len(pairs.images) + 1))
        self.caption_rows = [order[bounds[i] : bounds[i + 1]] for i in range(len(pairs.images))]
        self.transform = transform
        self.tokenize = tokenize
        self.seed = seed
        self.draft_size = draft_size
        self.epoch = 0  # set before each epoch's loader is made: workers copy the dataset then

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        rows = self.caption_rows[index]
        caption = self.captions[int(rows[rng.integers(len(rows))])]
        try:
            image = load_image(self.images[index], draft_size=self.draft_size).image
        except ImageLoadError:
            return None  # one bad file never stops a run
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**62)))  # the crop: torchvision draws from torch's RNG
            pixels = self.transform(image)
        return pixels, self.tokenize([caption])[0]


class EpochOrder(Sampler[int]):
    """A fixed permutation per (seed, epoch), started `skip` items in (for a resumed epoch)."""

    def __init__(self, size: int, seed: int, epoch: int, skip: int = 0):
        self.order = np.random.default_rng([seed, epoch, 7]).permutation(size)[skip:]

    def __iter__(self) -> Iterator[int]:
        return iter(int(i) for i in self.order)

    def __len__(self) -> int:
        return len(self.order)


def collate(
    items: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    kept = [it for it in items if it is not None]
    if not kept:
        return None
    return torch.stack([p for p, _ in kept]), torch.stack([t for _, t in kept])


def epoch_loader(
    data: PairDataset, epoch: int, batch_size: int, skip_batches: int, workers: int
) -> DataLoader:
    """The batches of `epoch`, without the first `skip_batches` (done before a kill)."""
    data.epoch = epoch
    sampler = EpochOrder(len(data), data.seed, epoch, skip_batches * batch_size)
    return DataLoader(
        data,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        drop_last=True,  # full batches: the contrastive loss compares within a batch
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


class EvalImages(Dataset):
    """Images through the model's evaluation transform, for the held-out split."""

    def __init__(self, paths: Sequence[str], transform: Transform, draft_size: int):
        self.paths = paths
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None]:
        try:
            return index, self.transform(load_image(self.paths[index], draft_size=self.draft_size).image)
        except ImageLoadError:
            return index, None


def collate_indexed(
    items: Sequence[tuple[int, torch.Tensor | None]],
) -> tuple[list[int], torch.Tensor | None]:
    kept = [(i, p) for i, p in items if p is not None]
    return [i for i, _ in kept], (torch.stack([p for _, p in kept]) if kept else None)
