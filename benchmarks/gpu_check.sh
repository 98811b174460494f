#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): one command, one GPU, under 8 minutes.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine; JSON to $OUT (or runs/gpu_check)
#   bash benchmarks/gpu_check.sh --dry-run    # the same sequence on CPU, tiny sizes (CI)
#
# Missing packages (deepspeed, megatron-core, open_clip, ...) come from a folder of wheels made
# by scripts/device_wheels.sh ($MEGACLIP_WHEELS, default .whl); they are installed into
# /tmp/megaclip-site when `import deepspeed, megatron.core, open_clip` fails. Further arguments
# go to gpu_check.py (--only STAGE,..., --out DIR, --deadline-s S).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] && [ -z "${VIRTUAL_ENV:-}" ] && source .venv/bin/activate
py="${PYTHON:-python3}"
wheels="${MEGACLIP_WHEELS:-.whl}"

if ! "$py" -c "import deepspeed, megatron.core, open_clip" >/dev/null 2>&1; then
  if compgen -G "$wheels/*.whl" >/dev/null; then
    site=/tmp/megaclip-site
    echo "[gpu_check] installing $(ls "$wheels"/*.whl | wc -l) carried wheels into $site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "[gpu_check] deepspeed / megatron-core / open_clip missing and no wheels in $wheels" >&2
    echo "[gpu_check] run scripts/device_wheels.sh here first and carry the folder" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" benchmarks/gpu_check.py "$@"
