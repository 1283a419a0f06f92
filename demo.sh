#!/usr/bin/env bash
# Set up .venv (if needed) with the examples' dependencies and run the end-to-end demo.
# Extra arguments go to `python -m coldbrew.demo`, for example --cold-rounds 5.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[examples]'
exec .venv/bin/python -m coldbrew.demo "$@"
