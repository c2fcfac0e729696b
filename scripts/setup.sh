#!/usr/bin/env bash
# Idempotent set-up: the CPU build of PyTorch first (a bare `pip install torch` pulls a CUDA build),
# then loralens. `setup.sh tests` (what test.sh runs) adds the test tools, the extras of the
# service, Ray and search (their tests run in CI) and Debian's chromium for the page's browser
# test (that test skips, saying why, where chromium cannot be installed). Run by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q "torch==2.13.0"
if [ "${1:-}" != tests ]; then
    python3 -m pip install -q -e .
    exit 0
fi
python3 -m pip install -q -e ".[dev,serve,ray,search]"
if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
            || echo "setup: could not install Debian's chromium; the page's browser test will skip" >&2
    else
        echo "setup: no chromium and no root apt-get; the page's browser test will skip" >&2
    fi
fi
