#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv, or $MMA_VENV) with mmadapters and its dev
# extras installed from pyproject.toml. Idempotent: reinstalls only when pyproject.toml changed or the
# environment no longer imports the stack. Prints the venv path on its last line.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MMA_VENV:-$root/.venv}
py=${PYTHON:-}
if [ -z "$py" ]; then
  for cand in python3.11 python3; do command -v "$cand" >/dev/null 2>&1 && { py=$cand; break; }; done
fi
[ -n "$py" ] || { echo "env.sh: no python3.11 or python3 on PATH" >&2; exit 1; }
"$py" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || {
  echo "env.sh: mmadapters needs Python 3.11; $py is $("$py" --version 2>&1)" >&2; exit 1; }

[ -x "$venv/bin/python" ] || { echo "creating $venv" >&2; "$py" -m venv "$venv"; }
stamp="$venv/.mmadapters-stamp"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1) $root"
check='import mmadapters, torchaudio, open_clip, timm, transformers, decord, sys, os
sys.exit(0 if os.path.dirname(os.path.dirname(os.path.abspath(mmadapters.__file__))) == sys.argv[1] else 1)'
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$venv/bin/python" -c "$check" "$root" >/dev/null 2>&1; then
  echo "installing mmadapters[dev] into $venv (first run downloads the pinned torch stack)" >&2
  start=$(date +%s)
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet -e "$root[dev]" >&2
  "$venv/bin/python" -c "$check" "$root"
  echo "$want" > "$stamp"
  echo "installed in $(( $(date +%s) - start )) s; venv size $(du -sh "$venv" | cut -f1)" >&2
fi
echo "$venv"
