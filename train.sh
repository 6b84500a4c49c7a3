#!/usr/bin/env bash
# Train SAM-RSP.
#   bash train.sh                                    toy quick start: generate the toy benchmark if missing,
#                                                    train the 3 stages on fold 0, test 1-shot, print the table
#   bash train.sh CONFIG [key=value ...]             one stage (train.stage from the config or an override)
#   bash train.sh DATASET SPLIT BACKBONE [SHOT] [key=value ...]
#                                                    e.g. bash train.sh pascal 0 resnet50 5 train.stage=bam
#   NPROC=4 bash train.sh ...                        torchrun with 4 processes (one per GPU)
set -euo pipefail
cd "$(dirname "$0")"
source tools/common.sh

if [ $# -eq 0 ]; then
  CFG=config/toy/toy.yaml
  OUT=${OUT:-exp/toy/quickstart}
  "$PYTHON" -m util.prepare toy
  run_python train.py "$CFG" train.stage=base output_dir="$OUT/base" resume=auto
  run_python train.py "$CFG" train.stage=bam output_dir="$OUT/bam" resume=auto \
      model.base_learner.checkpoint="$OUT/base/best.pth"
  run_python train.py "$CFG" train.stage=sam_rsp output_dir="$OUT/sam_rsp" resume=auto \
      model.rspg.checkpoint="$OUT/bam/best.pth"
  run_python test.py "$CFG" weights="$OUT/sam_rsp/best.pth" output_dir="$OUT/test"
  exit 0
fi
resolve_config "$@"
run_python train.py "${ARGS[@]}"
