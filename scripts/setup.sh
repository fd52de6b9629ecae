#!/usr/bin/env bash
# Creates .venv beside this repository and installs clipdex with its test tools. Safe to re-run:
# it installs again only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.clipdex-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setting up .venv (first run downloads torch: a few minutes)..." >&2
  # Some machines carry a local CPU-only torch wheel through pip's config (find-links) that
  # PyPI's torchvision cannot load ("operator torchvision::nms does not exist"): install from
  # the package index alone. No wheel cache: torch's CUDA wheels would take several GB twice.
  env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null \
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir -e ".[test,onnx,openvino,ray,parquet,postgresql]"
  touch "$stamp"
fi
