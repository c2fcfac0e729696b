#!/usr/bin/env bash
# Refresh constraints.txt: the newest releases pyproject.toml's ranges allow (torch stays at the
# locked version, the CPU build), resolved by pip in a fresh virtual environment and frozen; then
# the whole test suite (scripts/test.sh) on the new lock. The old lock comes back if it fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
torch=$(grep -m1 '^torch==' constraints.txt)
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q "$torch"
"$tmp/venv/bin/python" -m pip install -q -e ".[dev,serve,ray,search]"
cp constraints.txt "$tmp/old"
{
    echo "# The exact versions the tests pass with, for scripts/setup.sh (pip -c): pip freeze of a"
    echo "# fresh venv on $(python3 -V 2>&1), $(date -u +%Y-%m-%d). Refresh: bash scripts/lock.sh"
    "$tmp/venv/bin/python" -m pip freeze --exclude-editable --local | sed 's/+[a-z0-9.]*$//'
} >constraints.txt
if ! bash scripts/test.sh; then
    cp "$tmp/old" constraints.txt
    echo "lock: the tests failed on the new versions; constraints.txt is as it was" >&2
    exit 1
fi
git --no-pager diff --stat constraints.txt
