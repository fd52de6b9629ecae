"""Where an index's catalog lives: `catalog.sqlite` in the index folder (the default), or a
PostgreSQL database named by a URL, recorded in the folder's `catalog.url`.

A PostgreSQL catalog is chosen when an index is made, by `--catalog URL` or the environment
variable CLIPDEX_CATALOG; later opens read `catalog.url`, so `clipdex search` needs no option.
The recorded URL has no password (the folder may be shared storage): libpq supplies it from
PGPASSWORD or ~/.pgpass, or the full URL is given again by `--catalog`/CLIPDEX_CATALOG. Several
index folders (on several machines) may name one catalog: the vector files in each are caches.
No SQLAlchemy here: readers resolve this on every cold search.
"""

from __future__ import annotations

import os
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.core.errors import ClipdexError, IndexNotFoundError

CATALOG_NAME = "catalog.sqlite"
URL_NAME = "catalog.url"
CATALOG_ENV = "CLIPDEX_CATALOG"
_SCHEMES = ("postgresql+psycopg://", "postgresql://", "postgres://")


@dataclass(frozen=True)
class CatalogLocation:
    directory: Path
    url: str | None = None  # a PostgreSQL URL (SQLAlchemy form); None: SQLite in `directory`

    @property
    def is_postgres(self) -> bool:
        return self.url is not None

    @property
    def sqlite_path(self) -> Path:
        return self.directory / CATALOG_NAME

    def describe(self) -> str:
        """For messages and `clipdex info`: the URL without its password, or the file."""
        return without_password(self.url) if self.url is not None else str(self.sqlite_path)

    def libpq_conninfo(self) -> str:
        """The URL as libpq takes it (psycopg.connect), without SQLAlchemy's driver name."""
        assert self.url is not None
        return "postgresql://" + self.url.split("://", 1)[1]


def normalise_url(url: str) -> str:
    """A PostgreSQL URL in SQLAlchemy's psycopg 3 form; anything else is a one-line error."""
    url = url.strip()
    for scheme in _SCHEMES:
        if url.startswith(scheme):
            rest = url[len(scheme) :]
            if rest:
                return "postgresql+psycopg://" + rest
    raise ClipdexError(
        f"--catalog/{CATALOG_ENV} must be a PostgreSQL URL such as postgresql+psycopg://user@host/database "
        f"(got {without_password(url)!r}); a SQLite catalog always lives in the index folder"
    )


def without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = urllib.parse.quote(parts.username or "", safe="")
    host = parts.hostname or ""
    netloc = f"{user}@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def resolve_catalog(directory: Path, requested: str | None = None) -> CatalogLocation:
    """The catalog of the index in `directory`. `requested` (default: $CLIPDEX_CATALOG) names a
    PostgreSQL catalog: used for a new index; for an existing one it must be the one recorded."""
    if requested is None:
        requested = os.environ.get(CATALOG_ENV) or None
    wanted = normalise_url(requested) if requested is not None else None
    url_file = directory / URL_NAME
    if url_file.exists():
        recorded = normalise_url(url_file.read_text().strip())
        if wanted is None:
            return CatalogLocation(directory, recorded)
        if without_password(wanted) != recorded:
            raise ClipdexError(
                f"index {directory} keeps its catalog in {recorded}, not {without_password(wanted)}: "
                f"leave out --catalog/{CATALOG_ENV} or give that URL"
            )
        return CatalogLocation(directory, wanted)
    if wanted is not None and (directory / CATALOG_NAME).exists():
        raise ClipdexError(
            f"index {directory} keeps its catalog in {CATALOG_NAME} there, "
            f"not in {without_password(wanted)}: "
            f"unset {CATALOG_ENV} (or leave out --catalog) to use it"
        )
    return CatalogLocation(directory, wanted)


def catalog_exists(location: CatalogLocation) -> bool:
    """Whether the folder names a catalog (a PostgreSQL one may still lack its tables)."""
    if location.is_postgres:
        return (location.directory / URL_NAME).exists()
    return location.sqlite_path.exists()


def require_catalog(location: CatalogLocation) -> None:
    if not catalog_exists(location):
        raise IndexNotFoundError(f"no index at {location.directory}: build one with 'clipdex index FOLDER'")


def record_url(location: CatalogLocation) -> None:
    """Write `catalog.url` (no password) atomically: a crash leaves it whole or absent."""
    assert location.url is not None
    path = location.directory / URL_NAME
    text = without_password(location.url) + "\n"
    if path.exists() and path.read_text() == text:
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{URL_NAME}.", suffix=".tmp", dir=location.directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def connect_postgres(location: CatalogLocation, **options: Any) -> Any:
    """An autocommit psycopg connection to the catalog's database; a server that cannot be
    reached is a one-line error naming the catalog."""
    import psycopg  # only for PostgreSQL catalogs

    try:
        return psycopg.connect(location.libpq_conninfo(), autocommit=True, **options)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClipdexError(f"cannot reach the catalog {location.describe()}: {reason}") from None
