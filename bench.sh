#!/usr/bin/env bash
# Set up .venv (if needed) with the benchmark's dependencies, Ray included, and run the
# benchmark suite. Extra arguments go to `python -m bench`, for example --quick.
set -euo pipefail
cd "$(dirname "$0")"

scripts/venv.sh bench
exec .venv/bin/python -m bench "$@"
