"""Evaluation sets read from the formats people already have: what images, what texts, which go
together. Paths in a file are relative to that file's folder; images that are not there are left
out and counted (one missing file never stops an evaluation).

- captioned: a TSV of `image<TAB>caption` (several rows per image allowed), or COCO captions JSON;
- labelled: a folder with one subfolder per class, or a TSV of `image<TAB>label`.

A relative path not found beside the file is looked for in an `images` folder there (the layout
of Flickr8k and of many exports: captions.tsv beside images/).

A TSV may start with a header row; named columns (image/file/path, caption/text, label/class/name)
are then picked by name, which also tells a captioned TSV from a labelled one.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval.core.errors import ClipdexError
from retrieval.core.images import image_extensions


class DatasetError(ClipdexError):
    """An evaluation or training set that cannot be read."""


IMAGE_COLUMNS = ("image", "file", "filename", "file_name", "path", "filepath")
CAPTION_COLUMNS = ("caption", "text", "sentence", "description")
LABEL_COLUMNS = ("label", "class", "name", "classname", "class_name", "category")


@dataclass(frozen=True)
class CaptionSet:
    """Images and captions; `caption_image[j]` is the index of caption j's image."""

    images: tuple[str, ...]
    captions: tuple[str, ...]
    caption_image: np.ndarray
    source: str = ""
    missing: tuple[str, ...] = field(default=())  # images named but not found

    def without_images(self, drop: Iterable[int]) -> CaptionSet:
        """The set without the images at `drop` (unreadable ones) and their captions."""
        dropped = set(drop)
        if not dropped:
            return self
        keep = [i for i in range(len(self.images)) if i not in dropped]
        new_index = np.full(len(self.images), -1, np.int64)
        new_index[keep] = np.arange(len(keep))
        rows = [j for j, i in enumerate(self.caption_image) if int(i) not in dropped]
        return CaptionSet(
            tuple(self.images[i] for i in keep),
            tuple(self.captions[j] for j in rows),
            new_index[self.caption_image[rows]],
            self.source,
            self.missing,
        )

    def split(self, holdout: float, seed: int = 0) -> tuple[CaptionSet, CaptionSet]:
        """(train, held-out), split by image so that no image's captions are on both sides."""
        if not 0.0 <= holdout < 1.0:
            raise DatasetError(f"the held-out fraction must be in [0, 1), not {holdout}")
        n = len(self.images)
        count = int(round(n * holdout))
        order = np.random.default_rng(seed).permutation(n)
        held = set(order[:count].tolist())
        return self.without_images(held), self.without_images(set(range(n)) - held)


@dataclass(frozen=True)
class LabelledSet:
    """Images with one class each; `image_class[i]` indexes `classes`."""

    images: tuple[str, ...]
    classes: tuple[str, ...]
    image_class: np.ndarray
    source: str = ""
    missing: tuple[str, ...] = field(default=())

    def without_images(self, drop: Iterable[int]) -> LabelledSet:
        dropped = set(drop)
        keep = [i for i in range(len(self.images)) if i not in dropped]
        return LabelledSet(
            tuple(self.images[i] for i in keep),
            self.classes,
            self.image_class[keep],
            self.source,
            self.missing,
        )


Dataset = CaptionSet | LabelledSet


def load_dataset(path: str | os.PathLike[str], *, kind: str = "auto", images: str | None = None) -> Dataset:
    """Read an evaluation set. `kind`: auto, captions or labels (for a TSV whose header does not
    say). `images`: the image folder of a COCO JSON (default: found beside the annotations)."""
    p = Path(path).expanduser()
    if kind not in ("auto", "captions", "labels"):
        raise DatasetError(f"unknown dataset kind '{kind}': use auto, captions or labels")
    if p.is_dir():
        tsv = p / "captions.tsv"
        if tsv.is_file() and kind != "labels":
            return read_caption_tsv(tsv)
        return read_class_folders(p)
    if not p.is_file():
        raise DatasetError(f"dataset not found: {p}")
    if p.suffix.lower() == ".json":
        return read_coco_captions(p, images)
    return read_tsv(p, kind)


def read_tsv(path: Path, kind: str = "auto") -> Dataset:
    """A TSV of image and caption (or label); the header, if any, names the columns."""
    rows = _tsv_rows(path)
    header = [c.strip().lower() for c in rows[0]] if rows else []
    image_col, text_col, header_kind = _columns(header)
    if image_col is not None:
        rows = rows[1:]
    else:
        image_col, text_col = 0, 1
    if kind == "auto":
        kind = header_kind or _guess_kind(rows, image_col, text_col)
    pairs = []
    for n, row in enumerate(rows, start=1):
        if len(row) <= max(image_col, text_col) or not row[image_col].strip() or not row[text_col].strip():
            raise DatasetError(f"{path}: row {n} lacks an image or a text: {_short(row)}")
        pairs.append((row[image_col].strip(), row[text_col].strip()))
    if not pairs:
        raise DatasetError(f"{path}: no rows")
    base = path.parent
    if kind == "labels":
        return _labelled(base, pairs, str(path))
    return _captioned(base, pairs, str(path))


def read_caption_tsv(path: Path) -> CaptionSet:
    ds = read_tsv(path, "captions")
    assert isinstance(ds, CaptionSet)
    return ds


def read_coco_captions(path: Path, images: str | None = None) -> CaptionSet:
    """COCO captions JSON (`images` with file_name and id, `annotations` with image_id and caption)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        notes = [(int(a["image_id"]), str(a["caption"]).strip()) for a in data["annotations"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: not a COCO captions file ({type(exc).__name__}: {exc})") from None
    folder = Path(images).expanduser() if images else _coco_image_folder(path, list(files.values()))
    pairs = [(files[i], caption) for i, caption in notes if i in files and caption]
    if not pairs:
        raise DatasetError(f"{path}: no captions")
    return _captioned(folder, pairs, str(path))


def read_class_folders(folder: Path) -> LabelledSet:
    """One subfolder per class (its name is the label), images inside it (subfolders included)."""
    exts = image_extensions()
    pairs = []
    for sub in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for root, dirs, names in os.walk(sub):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                if Path(name).suffix.lower() in exts:
                    pairs.append((os.path.join(root, name), sub.name.replace("_", " ")))
    if not pairs:
        raise DatasetError(f"{folder}: no class subfolders with images (and no captions.tsv)")
    return _labelled(folder, pairs, str(folder))


def _captioned(base: Path, pairs: Sequence[tuple[str, str]], source: str) -> CaptionSet:
    where: dict[str, int] = {}
    images: list[str] = []
    missing: dict[str, None] = {}
    captions: list[str] = []
    owner: list[int] = []
    for name, caption in pairs:
        path = _resolve(base, name)
        if path not in where:
            if not os.path.isfile(path):
                missing[path] = None
                continue
            where[path] = len(images)
            images.append(path)
        captions.append(caption)
        owner.append(where[path])
    if not images:
        raise DatasetError(f"{source}: none of its {len(missing)} images were found under {base}")
    return CaptionSet(tuple(images), tuple(captions), np.asarray(owner, np.int64), source, tuple(missing))


def _labelled(base: Path, pairs: Sequence[tuple[str, str]], source: str) -> LabelledSet:
    classes = list(dict.fromkeys(label for _, label in pairs))
    class_index = {c: i for i, c in enumerate(classes)}
    images: list[str] = []
    labels: list[int] = []
    missing: list[str] = []
    seen: set[str] = set()
    for name, label in pairs:
        path = _resolve(base, name)
        if path in seen:
            raise DatasetError(f"{source}: {name} is listed twice (one label per image)")
        seen.add(path)
        if not os.path.isfile(path):
            missing.append(path)
            continue
        images.append(path)
        labels.append(class_index[label])
    if not images:
        raise DatasetError(f"{source}: none of its {len(missing)} images were found under {base}")
    return LabelledSet(tuple(images), tuple(classes), np.asarray(labels, np.int64), source, tuple(missing))


def _tsv_rows(path: Path) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None


def _columns(header: Sequence[str]) -> tuple[int | None, int, str | None]:
    """(image column, text column, 'captions' | 'labels' | None) from a header row, or (None, 1,
    None) when the first row is no header."""
    image = next((i for i, c in enumerate(header) if c in IMAGE_COLUMNS), None)
    if image is None:
        return None, 1, None
    caption = next((i for i, c in enumerate(header) if c in CAPTION_COLUMNS), None)
    if caption is not None:
        return image, caption, "captions"
    label = next((i for i, c in enumerate(header) if c in LABEL_COLUMNS), None)
    if label is not None:
        return image, label, "labels"
    return image, 1 if image != 1 else 0, None


def _guess_kind(rows: Sequence[Sequence[str]], image_col: int, text_col: int) -> str:
    """Labels when texts are shared between images (a class has many members), else captions."""
    owners: dict[str, set[str]] = {}
    for row in rows:
        if len(row) > max(image_col, text_col):
            owners.setdefault(row[text_col].strip(), set()).add(row[image_col].strip())
    return "labels" if any(len(v) > 1 for v in owners.values()) else "captions"


def _coco_image_folder(path: Path, names: Sequence[str]) -> Path:
    """COCO keeps annotations/captions_val2017.json beside val2017/: try that, then the JSON's folder."""
    split = path.stem.split("_")[-1]
    for folder in (path.parent.parent / split, path.parent / split, path.parent):
        if folder.is_dir() and any((folder / n).is_file() for n in names):
            return folder
    raise DatasetError(f"{path}: cannot find its images; pass the folder with --images")


def _resolve(base: Path, name: str) -> str:
    path = os.path.normpath(os.path.join(base, os.path.expanduser(name)))
    if not os.path.isabs(os.path.expanduser(name)) and not os.path.exists(path):
        beside = os.path.normpath(os.path.join(base, "images", name))
        if os.path.exists(beside):
            return beside
    return path


def _short(row: Sequence[str]) -> str:
    text = "\t".join(row)
    return text if len(text) <= 80 else text[:77] + "..."
