#!/usr/bin/env bash
# The main command: set-up, then the end-to-end demo (build a small zoo, train every model, print the table).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
loralens demo "$@"
