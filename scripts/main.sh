#!/usr/bin/env bash
# The main job: set up (or reuse) the environment, then run the demonstration. Args go to `mmadapters demo`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$root/scripts/env.sh" | tail -n 1)
cd "$root"
exec "$venv/bin/mmadapters" demo "$@"
