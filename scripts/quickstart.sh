#!/usr/bin/env bash
# The main job on the embedded default: install, build the tiny kit (offline), run surge training.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python train_surge_sdxl.py --config_file examples/quickstart.toml "$@"
