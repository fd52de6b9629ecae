#!/usr/bin/env bash
# Sets everything up on first run, then runs the linter, the import contracts and the whole test
# suite. The browser tests need Debian's chromium: installed here when running as root (CI),
# skipped with a reason otherwise. The PostgreSQL tests get a throwaway server on loopback
# (scripts/postgres.sh, Debian's postgresql installed as root where missing), stopped at the end
# whatever happens; CLIPDEX_TEST_POSTGRES=URL given by the caller means that server instead.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the browser tests..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium fonts-dejavu-core) >/dev/null || echo "chromium could not be installed: browser tests will be skipped" >&2
fi
.venv/bin/ruff check retrieval indexer cli server tests bench
.venv/bin/lint-imports
if [ -z "${CLIPDEX_TEST_POSTGRES:-}" ]; then
  # A cluster of this run's own (its own state file), so runs side by side never share one.
  CLIPDEX_PG_STATE=$(mktemp -u "${TMPDIR:-/tmp}/clipdex-postgres-test.XXXXXX")
  export CLIPDEX_PG_STATE
  trap 'scripts/postgres.sh stop' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  if scripts/postgres.sh start; then
    CLIPDEX_TEST_POSTGRES=$(scripts/postgres.sh url)
    export CLIPDEX_TEST_POSTGRES
  else
    echo "PostgreSQL could not be started: the PostgreSQL tests will be skipped" >&2
  fi
fi
.venv/bin/python -m pytest -q "$@"
