#!/usr/bin/env bash
# Idempotent set-up in a virtual environment of the checkout's own (.venv, or $LORALENS_VENV) with
# every package at the version in constraints.txt, the versions the tests passed with: a fresh
# machine and CI install the same thing. The venv is made anew when it holds anything else
# (another Python, an older lock, a package installed by hand), so it is always what a fresh one
# would be. `setup.sh tests` (what test.sh runs) adds the test tools and the extras of the
# service, Ray and search (their tests run in CI), and Debian's chromium for the page's browser
# test (that test skips, saying why, where chromium cannot be installed). Run by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=${LORALENS_VENV:-.venv}
extras=""
[ "${1:-}" = tests ] && extras="[dev,serve,ray,search]"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "setup: loralens needs Python >= 3.10 (python3 is $(python3 -V 2>&1))" >&2; exit 1; }

# What the venv would hold fresh: the locked versions of what `pip install -e .$extras` needs.
stamp="$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-16) $(python3 -V 2>&1)"
install() {
    # torch first, from the lock: with no torch installed a bare requirement can pull a CUDA build
    "$venv/bin/python" -m pip install -q -c constraints.txt "torch"
    "$venv/bin/python" -m pip install -q -c constraints.txt -e ".$extras"
}
unlocked() {  # installed packages whose name and version are not a line of the lock
    "$venv/bin/python" -m pip freeze --exclude-editable --local | sed 's/+[a-z0-9.]*$//' \
        | grep -vxFf <(grep -v '^#' constraints.txt) || true
}
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.loralens-setup" 2>/dev/null)" != "$stamp" ] \
    || [ -n "$(unlocked)" ]; then
    echo "setup: a fresh virtual environment in $venv (pinned by constraints.txt)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    echo "$stamp" >"$venv/.loralens-setup"
fi
install
extra=$(unlocked)
[ -z "$extra" ] || echo "setup: not in constraints.txt, installed anyway: $(echo $extra)" >&2

if [ -n "$extras" ] && ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
            || echo "setup: could not install Debian's chromium; the page's browser test will skip" >&2
    else
        echo "setup: no chromium and no root apt-get; the page's browser test will skip" >&2
    fi
fi
