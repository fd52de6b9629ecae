"""Folders to vectors: `from indexer import index_folders`."""

from .sync import IndexOptions, IndexSummary, index_folders

__all__ = ["IndexOptions", "IndexSummary", "index_folders"]
