# Shared by train.sh and test.sh (sourced).
# PYTHON: the interpreter; default ./.venv/bin/python when it exists and no virtualenv is active.
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ] && [ -z "${VIRTUAL_ENV:-}" ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# NPROC: processes (one per GPU) for torchrun; default: the number of visible CUDA GPUs (1 on CPU).
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
fi

run_python() {   # run_python SCRIPT ARGS...: plain python, or torchrun with $NPROC processes
  if [ "$NPROC" -gt 1 ]; then
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$@"
  else
    "$PYTHON" "$@"
  fi
}

resolve_config() {   # sets ARGS: CONFIG [overrides] from either CONFIG ... or DATASET SPLIT BACKBONE [SHOT] ...
  if [ -f "$1" ]; then
    ARGS=("$@")
    return
  fi
  if [ $# -lt 3 ]; then
    echo "error: expected CONFIG [key=value ...] or DATASET SPLIT BACKBONE [SHOT] [key=value ...]; '$1' is not a file" >&2
    exit 2
  fi
  local dataset=$1 split=$2 backbone=$3 shot=1
  shift 3
  case "$backbone" in vgg16_bn|vgg16) backbone=vgg ;; esac
  if [[ "${1:-}" =~ ^[0-9]+$ ]]; then shot=$1; shift; fi
  local config="config/${dataset}/${dataset}_split${split}_${backbone}.yaml"
  if [ ! -f "$config" ]; then
    echo "error: no config $config (datasets: pascal, coco; splits 0-3; backbones: vgg, resnet50, resnet101)" >&2
    exit 2
  fi
  ARGS=("$config" "data.shot=$shot" "$@")
}
