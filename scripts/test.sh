#!/usr/bin/env bash
# The test command: set up (or reuse) the environment, then run the whole suite. Extra args go to pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# the Debian packages the tests need (espeak-ng for generated speech); without them 19 speech tests would skip
bash "$root/scripts/system_deps.sh"
venv=$(bash "$root/scripts/env.sh" | tail -n 1)
cd "$root"
# The pytest executable (not `python -m pytest`) keeps the repo root off sys.path, so tests see the
# installed package layout: `import mmadapters.speech` works and `import speech` does not.
exec "$venv/bin/pytest" -q "$@"
