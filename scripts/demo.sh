#!/usr/bin/env bash
# The embedded default, end to end on CPU (a few minutes):
#   1. real data: scikit-learn's handwritten digits written as webdataset shards (+ held-out split)
#   2. train a small CLIP on 2 processes with the deepspeed launcher (data parallel, ZeRO-1)
#   3. zero-shot classification of the held-out digits ("a photo of the number seven", ...)
#   4. convert the sharded DeepSpeed checkpoint into one open_clip-format file
#   Extra arguments are config overrides for step 2, e.g. `bash scripts/demo.sh train.loss=siglip`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] && source .venv/bin/activate
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
DATA="${DATA:-demo_data}" RUN="${RUN:-runs/demo}" STEPS="${STEPS:-300}"

echo "== 1/4 demo data -> $DATA"
[ -f "$DATA/manifest.json" ] || megaclip data make-demo "$DATA"

echo "== 2/4 train (deepspeed launcher, 2 CPU processes) -> $RUN"
deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29511}" --module megaclip.cli.main train \
  --config configs/demo.yaml \
  "data.train=$DATA/train-{000000..000003}.tar" \
  "zeroshot.data=$DATA/val-000000.tar" "zeroshot.classnames=$DATA/classnames.txt" \
  "zeroshot.templates=$DATA/templates.txt" "train.out_dir=$RUN" "train.steps=$STEPS" "$@"

echo "== 3/4 zero-shot evaluation on the held-out split"
megaclip eval zeroshot --checkpoint "$RUN/final_open_clip.pt" --data "$DATA/val-000000.tar" \
  --classnames "$DATA/classnames.txt" --templates "$DATA/templates.txt"

echo "== 4/4 convert the sharded checkpoint to one open_clip file"
megaclip convert "$RUN/checkpoints" --to open_clip --out "$RUN/demo_open_clip.pt"
echo "done: $RUN/demo_open_clip.pt loads with open_clip.create_model(...) + load_state_dict(strict=True)"
