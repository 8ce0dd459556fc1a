#!/usr/bin/env bash
# One command: .venv with Python >= 3.12, the pinned requirements and tunix_core itself (editable).
# Running it again only installs what changed.
set -euo pipefail
cd "$(dirname "$0")"

is_312() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

if [ -x .venv/bin/python ] && is_312 .venv/bin/python; then
  py=.venv/bin/python
else
  found=""
  candidates=("${PYTHON:-}" python3.13 python3.12 python3)
  if command -v pyenv >/dev/null 2>&1; then
    root=$(pyenv root)
    for v in "$root"/versions/3.1[2-9]*; do [ -x "$v/bin/python3" ] && candidates+=("$v/bin/python3"); done
  fi
  for c in "${candidates[@]}"; do
    [ -n "$c" ] || continue
    if is_312 "$c"; then found=$c; break; fi
  done
  if [ -z "$found" ]; then
    echo "setup.sh: no Python >= 3.12 found (jax 0.11 needs it); install one, or set PYTHON=/path/to/python3.12" >&2
    exit 1
  fi
  rm -rf .venv
  "$found" -m venv .venv
  py=.venv/bin/python
fi

"$py" -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
"$py" -m pip install -q --disable-pip-version-check --no-deps -e .
echo "ready: source .venv/bin/activate"
