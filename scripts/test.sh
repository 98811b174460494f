#!/usr/bin/env bash
# The test suite (unit + real multi-process gloo runs). Assumes scripts/install.sh has run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] && source .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
exec python -m pytest -q -p no:cacheprovider "$@"
