#!/usr/bin/env bash
# Fetch the Python wheels the GPU device image lacks into one folder to carry there.
#
#   bash scripts/device_wheels.sh [DEST]        # default DEST: .whl (add /.whl/ to .git/info/exclude)
#   bash scripts/device_wheels.sh --check DEST  # only check an existing folder
#
# The device image (Python 3.12, torch 2.11, x86-64, no network) has no deepspeed, megatron-core
# or open_clip, nor pydantic, hjson or ftfy; it has torch, torchvision, numpy, sentencepiece,
# safetensors, regex, timm, msgpack, ninja, psutil, py-cpuinfo, einops and the rest megaclip
# needs. Wheels are fetched for cp312 / abi3 / py3-none-any on manylinux x86-64, without their
# dependencies (each one needed is named below). DeepSpeed is published as a source archive
# only: it is built here into a pure-Python wheel (DS_BUILD_OPS=0; megaclip uses torch's AdamW,
# so no DeepSpeed kernel is needed), which needs torch in this environment (--no-build-isolation).
# On the device, benchmarks/gpu_check.sh installs the folder with
#   python3 -m pip install --no-index --no-deps --target /tmp/megaclip-site DEST/*.whl
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] && [ -z "${VIRTUAL_ENV:-}" ] && source .venv/bin/activate
py="${PYTHON:-python3}"

# name==version: the versions the CPU machines test with (scripts/install.sh, FINDINGS)
DEEPSPEED="deepspeed==0.19.8"
WHEELS=(
  "megatron-core==0.16.1"
  "open_clip_torch==3.3.0"
  "ftfy==6.3.1" "wcwidth==0.9.4"                   # open_clip, megaclip's caption clean-up
  "hjson==3.1.0"                                   # deepspeed
  "pydantic==2.14.4" "pydantic_core==2.50.5"       # deepspeed's config
  "annotated-types==0.8.0" "typing-inspection==0.4.5" "typing_extensions==4.16.0"
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any)

check_only=0
if [ "${1:-}" = "--check" ]; then
  check_only=1
  shift
fi
dest="${1:-.whl}"
mkdir -p "$dest"

check() {
  # every wheel installable on the device: cp312/abi3/py3 tags, x86-64 or pure, one version each
  "$py" - "$dest" "${DEEPSPEED%%==*}" "${WHEELS[@]%%==*}" <<'EOF'
import re, sys
from pathlib import Path
dest, wanted = Path(sys.argv[1]), sys.argv[2:]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
problems, seen = [], {}
for whl in sorted(dest.glob("*.whl")):
    name, version, *rest = whl.name[:-4].split("-")
    py, abi, plat = rest[-3:]
    seen.setdefault(norm(name), []).append(version)
    if not (py.startswith(("cp312", "py3", "cp310")) and abi in ("none", "cp312", "abi3")):
        problems.append(f"{whl.name}: python tag {py}-{abi} does not run on CPython 3.12")
    if plat != "any" and "x86_64" not in plat:
        problems.append(f"{whl.name}: platform {plat} is not x86-64")
for name, versions in seen.items():
    if len(versions) > 1:
        problems.append(f"{name}: {len(versions)} versions {versions} (pip refuses to install both)")
missing = [w for w in wanted if norm(w) not in seen]
problems += [f"{w}: no wheel in {dest}" for w in missing]
size = sum(p.stat().st_size for p in dest.glob("*.whl"))
print(f"[device_wheels] {len(seen)} wheels, {size / 2**20:.1f} MiB in {dest}")
for p in problems:
    print(f"[device_wheels] problem: {p}")
sys.exit(1 if problems else 0)
EOF
}

if [ "$check_only" = 1 ]; then
  check
  exit
fi

plat_args=()
for p in "${PLATFORMS[@]}"; do plat_args+=(--platform "$p"); done
echo "[device_wheels] downloading ${#WHEELS[@]} wheels for CPython 3.12 x86-64 into $dest"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat_args[@]}" -d "$dest" "${WHEELS[@]}"

if ! ls "$dest"/deepspeed-"${DEEPSPEED#*==}"-py3-none-any.whl >/dev/null 2>&1; then
  echo "[device_wheels] building a pure-Python $DEEPSPEED wheel (source archive only on PyPI)"
  if ! "$py" -c "import torch, setuptools, wheel" >/dev/null 2>&1; then
    echo "[device_wheels] building deepspeed needs torch, setuptools and wheel in $py's" \
      "environment: run scripts/install.sh, or set PYTHON / activate such a venv" >&2
    exit 2
  fi
  src="$(mktemp -d)"
  trap 'rm -rf "$src"' EXIT
  "$py" -m pip download -q --no-deps --no-binary=:all: -d "$src" "$DEEPSPEED"
  DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "$src"/*.tar.gz
fi
check
