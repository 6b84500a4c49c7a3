#!/usr/bin/env bash
# Create ./.venv (if missing) and install the requirements from this repository's files.
#   bash install.sh          runtime requirements
#   bash install.sh --dev    + test requirements
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
else
  .venv/bin/python -m pip install --quiet -r requirements.txt
fi
echo "installed into $(pwd)/.venv"
