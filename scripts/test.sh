#!/usr/bin/env bash
# The test command: installs what is missing (scripts/setup.sh), then pytest on tests/.
# Slow tests run too when SURGE_RUN_SLOW=1 or --runslow is passed.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
exec .venv/bin/python -m pytest -q "$@"
