#!/usr/bin/env bash
# Create .venv in the repository root if it is missing and install coldbrew into it with
# the extras given as the first argument, e.g. `scripts/venv.sh test`. Shared by
# demo.sh, test.sh and bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$1]"
