#!/usr/bin/env bash
# Sets everything up on first run, then runs the linter and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check retrieval indexer cli tests bench
.venv/bin/python -m pytest -q "$@"
