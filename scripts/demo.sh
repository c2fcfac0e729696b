#!/usr/bin/env bash
# The main command: set-up (a virtual environment pinned by constraints.txt), then the end-to-end
# demo (build a small zoo, train every model, print the table). Afterwards
# `source .venv/bin/activate` puts `loralens` on the PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec "${LORALENS_VENV:-.venv}/bin/loralens" demo "$@"
