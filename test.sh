#!/usr/bin/env bash
# Test a checkpoint with the original protocol (5 seeds x 1000 episodes, mean +- std, per seed, per class).
#   bash test.sh                                     the toy quick start's checkpoint
#   bash test.sh CONFIG weights=PATH [key=value ...]
#   bash test.sh DATASET SPLIT BACKBONE [SHOT] weights=PATH [key=value ...]
#                                                    e.g. bash test.sh pascal 0 resnet50 5 weights=exp/.../best.pth
#   NPROC=2 bash test.sh ...                         torchrun: episodes sharded, identical numbers
set -euo pipefail
cd "$(dirname "$0")"
source tools/common.sh

if [ $# -eq 0 ]; then
  OUT=${OUT:-exp/toy/quickstart}
  run_python test.py config/toy/toy.yaml weights="$OUT/sam_rsp/best.pth" output_dir="$OUT/test"
  exit 0
fi
resolve_config "$@"
run_python test.py "${ARGS[@]}"
