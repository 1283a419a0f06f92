#!/usr/bin/env bash
# Set up .venv (if needed) with the examples' dependencies and run the end-to-end demo.
# Extra arguments go to `python -m coldbrew.demo`, for example --cold-rounds 5.
set -euo pipefail
cd "$(dirname "$0")"

scripts/venv.sh examples
exec .venv/bin/python -m coldbrew.demo "$@"
