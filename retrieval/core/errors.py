"""Errors the library raises on purpose; the CLI prints them as one line, without a traceback."""

from __future__ import annotations


class ClipdexError(Exception):
    """Base class: a problem the user can act on, described in one sentence."""


class IndexNotFoundError(ClipdexError):
    pass


class ModelMismatchError(ClipdexError):
    pass


class ModelLoadError(ClipdexError):
    pass


class IndexLockedError(ClipdexError):
    pass


class IndexWriteError(ClipdexError):
    """The index directory cannot be written (read-only, disk full): the index on disk is untouched."""


class ImageLoadError(ClipdexError):
    """One file cannot be used as an image; the reason is the message."""
