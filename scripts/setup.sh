#!/usr/bin/env bash
# Idempotent set-up: the CPU build of PyTorch first (a bare `pip install torch` pulls a CUDA build),
# then loralens with its test tools and Ray (the zoo's --ray tests run in CI). Sourced by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[dev,ray]"
