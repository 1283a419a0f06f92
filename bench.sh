#!/usr/bin/env bash
# Set up .venv (if needed) with the benchmark's dependencies, Ray included, and run the
# benchmark suite. Extra arguments go to `python -m bench`, for example --quick.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
exec .venv/bin/python -m bench "$@"
