#!/usr/bin/env bash
# The test command: set-up (a virtual environment pinned by constraints.txt), lint, then the
# whole test suite in that environment.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh tests
py="${LORALENS_VENV:-.venv}/bin/python"
"$py" -m ruff check src tests benchmarks
"$py" -m ruff format --check src tests benchmarks
"$py" -m pytest -q "$@"
