#!/usr/bin/env bash
# Usage: scripts/quickstart.sh FOLDER "QUERY" [clipdex index options...]
# Sets everything up on first run, indexes FOLDER (incrementally), then searches it for QUERY.
# Without network access, pass a downloaded checkpoint: --pretrained /path/to/open_clip_pytorch_model.bin
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 FOLDER \"QUERY\" [clipdex index options, e.g. --pretrained FILE]" >&2
  exit 2
fi
here="$(cd "$(dirname "$0")/.." && pwd)"
folder=$1 query=$2
shift 2
"$here/scripts/setup.sh"
"$here/.venv/bin/clipdex" index "$folder" "$@"
"$here/.venv/bin/clipdex" search "$query"
