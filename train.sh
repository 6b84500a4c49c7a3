#!/usr/bin/env bash
# Train SAM-RSP.
#   bash train.sh                                    toy quick start: generate the toy benchmark if missing,
#                                                    train the 3 stages on fold 0, test 1-shot, print the table
#   bash train.sh toy-sccan                          the same, plus SCCAN and SAM-RSP over SCCAN, and one table:
#                                                    baseline, BAM, SCCAN, SAM-RSP(BAM), SAM-RSP(SCCAN)
#   bash train.sh toy-weakshot                       weak-shot segmentation on the toy (fold 0 novel = image labels
#                                                    only): base-only, SimFormer w/o SimNet, SimFormer, fully
#                                                    supervised; one table of base / novel / all / harmonic mIoU
#   bash train.sh toy-cat-sam                        CAT-SAM on a toy domain shift (util/cat_sam_toy.py): tiny SAM
#                                                    pretrained on the source domain (cached), then zero-shot,
#                                                    decoder-only, CAT-SAM-T, CAT-SAM-A from ONE target image for
#                                                    each seed of eval.seeds; one table of foreground IoU
#   bash train.sh CONFIG [key=value ...]             one stage (train.stage from the config or an override)
#   bash train.sh DATASET SPLIT BACKBONE [SHOT] [key=value ...]
#                                                    e.g. bash train.sh pascal 0 resnet50 5 train.stage=bam
#   NPROC=4 bash train.sh ...                        torchrun with 4 processes (one per GPU)
set -euo pipefail
cd "$(dirname "$0")"
source tools/common.sh

CFG=config/toy/toy.yaml
OUT=${OUT:-exp/toy/quickstart}

toy_samrsp_bam() {   # the quick start's three stages (each reused when its run is complete)
  "$PYTHON" -m util.prepare toy
  run_python train.py "$CFG" train.stage=base output_dir="$OUT/base" resume=auto
  run_python train.py "$CFG" train.stage=bam output_dir="$OUT/bam" resume=auto \
      model.base_learner.checkpoint="$OUT/base/best.pth"
  run_python train.py "$CFG" train.stage=sam_rsp output_dir="$OUT/sam_rsp" resume=auto \
      model.rspg.checkpoint="$OUT/bam/best.pth"
}

if [ $# -eq 0 ]; then
  toy_samrsp_bam
  run_python test.py "$CFG" weights="$OUT/sam_rsp/best.pth" output_dir="$OUT/test"
  exit 0
fi
if [ "$1" = "toy-sccan" ]; then   # + SCCAN and SAM-RSP over SCCAN; one table of the five rows
  shift
  toy_samrsp_bam
  run_python train.py "$CFG" train.stage=sccan output_dir="$OUT/sccan" resume=auto "$@"
  run_python train.py "$CFG" train.stage=sam_rsp model.rspg.type=sccan output_dir="$OUT/sam_rsp_sccan" resume=auto \
      model.rspg.checkpoint="$OUT/sccan/best.pth" "$@"
  [ -f "$OUT/test/results.json" ] || run_python test.py "$CFG" weights="$OUT/sam_rsp/best.pth" output_dir="$OUT/test"
  run_python test.py "$CFG" model.rspg.type=sccan weights="$OUT/sam_rsp_sccan/best.pth" output_dir="$OUT/test_sccan"
  "$PYTHON" -m util.toy_report "$OUT/test/results.json" "$OUT/test_sccan/results.json"
  exit 0
fi
if [ "$1" = "toy-weakshot" ]; then   # SimFormer and its three variants on the toy; one table (util/weakshot_report.py)
  shift
  "$PYTHON" -m util.prepare toy
  WS=${OUT_WEAKSHOT:-exp/toy/weakshot}
  weakshot_variant() {   # train (resumable) and test one variant; its log in $WS/<variant>.log
    local variant=$1 config=config/toy/weakshot_$1.yaml
    shift
    [ "$variant" = simformer ] && config=config/toy/weakshot.yaml
    mkdir -p "$WS"
    {
      run_python train.py "$config" output_dir="$WS/$variant" resume=auto "$@" &&
      { [ -f "$WS/test_$variant/results.json" ] ||
        run_python test.py "$config" weights="$WS/$variant/best.pth" output_dir="$WS/test_$variant" "$@"; }
    } > "$WS/$variant.log" 2>&1 || { echo "toy-weakshot: variant $variant failed, see $WS/$variant.log" >&2; return 1; }
    echo "toy-weakshot: $variant done"
  }
  # two variants at a time, one thread each (the tiny networks gain little from a second thread;
  # two processes use both cores): about half the wall time of one after the other
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  for pair in "base_only no_simnet" "simformer full"; do
    pids=()
    for variant in $pair; do weakshot_variant "$variant" "$@" & pids+=($!); done
    for pid in "${pids[@]}"; do wait "$pid"; done
  done
  "$PYTHON" -m util.weakshot_report "$WS"/test_{base_only,no_simnet,simformer,full}/results.json
  exit 0
fi
if [ "$1" = "toy-cat-sam" ]; then   # CAT-SAM on the toy domain shift; one table (python -m util.cat_sam_toy report)
  shift
  # one thread per process: on 2 shared cores, 2 threads per process measured 5-10x slower per step
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  CS=${OUT_CAT_SAM:-exp/toy/cat_sam}
  CSCFG=config/toy/cat_sam.yaml
  "$PYTHON" -m util.cat_sam_toy prepare
  "$PYTHON" -m util.cat_sam_toy pretrain --config "$CSCFG"      # kept when model.sam.checkpoint exists
  read -r SAM SEEDS < <("$PYTHON" -c "from util.config import load_config as l; c = l('$CSCFG')
print(c.model.sam.checkpoint, ' '.join(str(s) for s in c.eval.seeds))")
  [ -f "$CS/test_zero_shot/results.json" ] || run_python test.py "$CSCFG" model.cat_sam.variant=zero_shot \
      weights="$SAM" output_dir="$CS/test_zero_shot" "$@"
  results=("$CS/test_zero_shot/results.json")
  for seed in $SEEDS; do
    for variant in decoder t a; do
      run="$CS/${variant}_seed$seed"
      [ -f "$run/results.json" ] || run_python train.py "$CSCFG" model.cat_sam.variant=$variant seed=$seed \
          output_dir="$run" resume=auto "$@"
      [ -f "$run/test/results.json" ] || run_python test.py "$CSCFG" model.cat_sam.variant=$variant seed=$seed \
          weights="$run/best.pth" output_dir="$run/test" "$@"
      results+=("$run/test/results.json")
    done
  done
  "$PYTHON" -m util.cat_sam_toy report "${results[@]}"
  exit 0
fi
resolve_config "$@"
run_python train.py "${ARGS[@]}"
