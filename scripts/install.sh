#!/usr/bin/env bash
# Create (or reuse) a virtual environment with everything megaclip needs on a CPU machine.
#
#   bash scripts/install.sh            # venv in ./.venv
#   MEGACLIP_VENV=/path bash scripts/install.sh
#
# torch is pinned to 2.14.1 + torchvision 0.29.1: the pair that this machine kind holds on local
# disk (no download) and the only one with which open_clip (a test reference) imports. On a GPU
# cluster install torch for your CUDA first and then `pip install -e .` (setup.py keeps a range).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MEGACLIP_VENV:-$here/.venv}"
py="${PYTHON:-python3}"
log() { printf '[install] %s\n' "$*"; }

if [ ! -x "$venv/bin/python" ]; then
  log "creating venv at $venv"
  "$py" -m venv "$venv"
fi
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
stamp="$venv/.megaclip-install-stamp"
want="$(cat "$here/setup.py" "$here/scripts/install.sh" | sha1sum | cut -c1-12)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  log "venv up to date ($venv)"
  exit 0
fi

t0=$SECONDS
# DeepSpeed's async_io op (ZeRO-Infinity's NVMe offload) needs libaio's headers.
if [ ! -f /usr/include/libaio.h ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "libaio-dev (DeepSpeed's async_io op for NVMe offload)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libaio-dev >/dev/null; } \
      || log "apt-get could not install libaio-dev: NVMe offload will be refused until it is there"
  else
    log "libaio-dev is missing: NVMe offload needs it (sudo apt-get install libaio-dev, then rerun)"
  fi
fi
log "torch==2.14.1 torchvision==0.29.1 (local disk on this machine kind)"
pip install "torch==2.14.1" "torchvision==0.29.1"
if ! "$venv/bin/python" -c "import deepspeed" 2>/dev/null; then
  log "deepspeed==0.19.8 with its CPU shared-memory comm op prebuilt (avoids a JIT build per launch)"
  pip install ninja packaging psutil py-cpuinfo pydantic hjson msgpack einops tqdm numpy
  DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 pip install --no-build-isolation --no-deps "deepspeed==0.19.8"
fi
# async_io is built through DeepSpeed's own JIT path into the torch extensions cache, once: its
# setup.py prebuild (DS_BUILD_AIO=1) leaves the op unlinked from libaio (ImportError io_submit).
if [ -f /usr/include/libaio.h ]; then
  log "DeepSpeed's async_io op (NVMe offload), built once into the torch extensions cache"
  # the venv's ninja, as in every later run (scripts/test.sh activates the venv): a build by
  # another ninja version (the system's) reads as stale to it and is rebuilt, minutes on 2 cores
  PATH="$venv/bin:$PATH" DS_ACCELERATOR=cpu "$venv/bin/python" -c "from deepspeed.accelerator import get_accelerator as g
g().create_op_builder('AsyncIOBuilder').load(verbose=False)" >/dev/null 2>&1 \
    || log "async_io did not build here: a run with NVMe offload builds it at first use"
fi
log "megaclip + test/dev extras"
# transformers / clip-benchmark: the versions the HF and CLIP_benchmark tests were run with.
pip install "megatron-core==0.16.1" "transformers==5.24.0" "clip-benchmark==1.6.2" \
  -e "$here[test,dev,demo,plot,tensorboard,hf]"
echo "$want" > "$stamp"
log "done in $((SECONDS - t0)) s"
