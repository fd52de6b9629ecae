#!/usr/bin/env bash
# Usage: scripts/quickstart.sh [clipdex index options...]
#        scripts/quickstart.sh FOLDER "QUERY" [clipdex index options...]
# Sets everything up on first run, then indexes and searches:
# - with no folder, the project's sample pictures (data/) for "a red circle", in an index of their
#   own that is made afresh each time: <clipdex cache folder>/quickstart-index (the cache folder is
#   $CLIPDEX_CACHE, else the per-user cache, e.g. ~/.cache/clipdex). Your own index is not touched.
# - with FOLDER, FOLDER (incrementally) into your index ($CLIPDEX_INDEX or the per-user default).
# Without network access, pass weights you downloaded elsewhere: --pretrained FILE, or
# QUICKSTART_PRETRAINED=FILE; QUICKSTART_PRETRAINED=random tries the loop with untrained weights.
# QUICKSTART_SETUP=0 skips scripts/setup.sh (a .venv that is managed otherwise).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
usage="usage: $0 [FOLDER \"QUERY\"] [clipdex index options, e.g. --pretrained FILE]"
if [ $# -ge 1 ] && [[ $1 != -* ]] && [ $# -lt 2 ]; then
  echo "$usage" >&2
  exit 2
fi
if [ "${QUICKSTART_SETUP:-1}" != 0 ]; then
  "$here/scripts/setup.sh"
fi
clipdex="$here/.venv/bin/clipdex"
options=()
if [ -n "${QUICKSTART_PRETRAINED:-}" ]; then
  options+=(--pretrained "$QUICKSTART_PRETRAINED")
fi

if [ $# -ge 2 ] && [[ $1 != -* ]]; then
  folder=$1 query=$2
  shift 2
  "$clipdex" index "$folder" ${options[@]+"${options[@]}"} "$@"
  "$clipdex" search "$query"
  exit
fi

# The samples: a fresh index in clipdex's cache folder, never inside data/ or in your own index.
cache=$("$here/.venv/bin/python" -c \
  'import os, platformdirs; print(os.environ.get("CLIPDEX_CACHE") or platformdirs.user_cache_dir("clipdex", appauthor=False))')
[ -n "$cache" ] || { echo "quickstart: no cache folder" >&2; exit 1; }
index="$cache/quickstart-index"
rm -rf -- "$index"
"$clipdex" index "$here/data" --index "$index" ${options[@]+"${options[@]}"} "$@"
"$clipdex" search "a red circle" --index "$index"
echo "(sample index: $index; try: $clipdex similar $here/data/sun_over_field.jpg --index $index)" >&2
