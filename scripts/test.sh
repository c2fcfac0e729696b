#!/usr/bin/env bash
# The test command: set-up, lint, then the whole test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh tests
python3 -m ruff check src tests benchmarks
python3 -m ruff format --check src tests benchmarks
python3 -m pytest -q "$@"
