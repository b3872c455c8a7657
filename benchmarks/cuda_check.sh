#!/usr/bin/env bash
# The CUDA check, run by hand on a machine with a CUDA GPU, from the repository's root:
#     bash benchmarks/cuda_check.sh CIFAR10.tar.gz OUT_DIR
# 1. the tests written for a GPU (tests/test_cuda.py) and those that touch the device choice;
# 2. `exitwise study --device cuda` on b-resnet11 (shipped weights), its folder packed as study.tar.gz;
# 3. benchmarks/early_exit_speed.py --device cuda on b-resnet11 (batch 1 on the first 2,000 test images);
# 4. the whole test suite (on CPU, as CI runs it; with pytest-xdist where installed), if time is left.
# Each step has its own time limit and a failing step does not stop the next. Uses src/ in place (PYTHONPATH),
# so no install is needed where torch is already there. Each step's output goes to OUT_DIR/<step>.txt.
set -u
DATA=${1:?usage: cuda_check.sh CIFAR10.tar.gz OUT_DIR}
OUT=${2:?usage: cuda_check.sh CIFAR10.tar.gz OUT_DIR}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  lscpu | grep -E 'Model name|^CPU\(s\)'; } >"$OUT/machine.txt" 2>&1
step tests_cuda 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_hardware.py
step study 180 python3 -m exitwise study --model b-resnet11 --device cuda --dataset cifar10 --data-dir "$DATA" \
    --out "$OUT/study" --no-progress
tar -czf "$OUT/study.tar.gz" -C "$OUT" study && rm -rf "$OUT/study"
step speed 180 python3 benchmarks/early_exit_speed.py --model b-resnet11 --device cuda --data "$DATA" \
    --batch1-images 2000
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
step tests_all 150 python3 -m pytest -q -p no:cacheprovider $xdist tests
