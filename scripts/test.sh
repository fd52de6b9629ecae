#!/usr/bin/env bash
# Sets everything up on first run, then runs the linter, the import contracts and the whole test
# suite. The browser tests need Debian's chromium: installed here when running as root (CI),
# skipped with a reason otherwise.
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
.venv/bin/python -m pytest -q "$@"
