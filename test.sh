#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"

scripts/venv.sh test
exec .venv/bin/python -m pytest "$@"
