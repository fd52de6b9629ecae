"""Names the catalog's SQL shares between the SQLAlchemy models (schema.py, used by writers) and
the raw reads (catalog.py), kept here so that readers need not import SQLAlchemy."""

SCHEMA_VERSION = 3
ACTIVE, PENDING = "active", "pending"  # models.state

# Indexes an older clipdex made and this one drops. ix_images_content_hash: random sha256 keys,
# so an add of 10k images at a million rewrote every leaf of it (bench/scale.py: 231 MB written
# with it, 51 MB without); searches leave an upload's copies out by the digests of the rows
# they rank (retrieval.search.ranking), which needs no index.
RETIRED_INDEXES = ("ix_images_content_hash",)

# meta key: the change log (vectors.generation, removals) is complete for every generation
# after this one; catching up from an older stamp needs the full id diff.
CHANGES_FROM = "changes_from"


def parse_changes_from(raw: str | None) -> int:
    """The CHANGES_FROM value as stored; a catalog without one has no log: never catch up."""
    return int(raw) if raw is not None else 1 << 62


# When a photo was taken, or else last changed: what the date filters compare. The index
# `ix_images_by_date` is on this very expression, and the filters write it verbatim, so that the
# database uses the index.
TAKEN_OR_CHANGED = "coalesce(taken_at, mtime_ns / 1e9)"
