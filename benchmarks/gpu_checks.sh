#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in priority order, each under its own time limit so one
# hang cannot take the rest with it. Runs from the source tree (no install needed when torch,
# timm and scikit-learn are present). Logs and JSON go to $OUT (default ./gpu-checks).
#
#     bash benchmarks/gpu_checks.sh                       # about 13 minutes on an H200 (its steps' sum)
#     ONLY="loop_auto loop_fp32" bash benchmarks/gpu_checks.sh  # just those steps
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS CMD...: run CMD, log to $OUT/NAME.log, report its exit status
    local name=$1 limit=$2
    shift 2
    [[ -z ${ONLY:-} || " $ONLY " == *" $name "* ]] || return 0
    echo "=== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
step probe_tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_probe.py -k cuda
step train_fast 330 $PY benchmarks/train_throughput.py --json "$OUT/train_throughput.json"
step probe_speed 120 $PY benchmarks/probe_speed.py --device cuda --repeats 3 --ref-repeats 0 --json "$OUT/probe_speed.json"
step probe_grad 60 $PY benchmarks/probe_speed.py --grad-bench --device cuda --json "$OUT/probe_grad.json"
# Each eager lever alone (compile alone is left out: it costs a compile per model).
step train_levers 150 $PY benchmarks/train_throughput.py --models resnet50 --levers --configs fp32,+bf16,+channels_last,+fused,+tf32 \
    --json "$OUT/train_levers.json"
step train_levers_vit 120 $PY benchmarks/train_throughput.py --models vit_b16 --levers \
    --configs fp32,+bf16,+channels_last,+fused,+tf32 --json "$OUT/train_levers_vit.json"
# lpft's own LP-FT loop on CUDA (untrained ResNet-18 on digits): the fast path lpft picks on
# CUDA against every lever off. (DDP over NCCL needs two GPUs.) Preparing digits needs npm once;
# on a machine without it, bring a prepared cache: LPFT_CACHE=<dir holding benchmarks/digits>.
RUN=(-m lpft.cli run digits --backbone timm:resnet18 --weights random --image-size 32 --method lpft --epochs 3 --device cuda)
step loop_auto 120 $PY "${RUN[@]}" --json "$OUT/loop_auto.json"
step loop_fp32 90 $PY "${RUN[@]}" --precision fp32 --channels-last off --compile off --json "$OUT/loop_fp32.json"
# Data at scale: fine-tuning from a JPEG folder (paper augmentation; JPEGs decoded by the workers,
# then on the GPU: --decode workers vs device, which sets what --decode auto should mean) against
# synthetic GPU-resident batches; the probe's whole C path on ImageNet-size memory-mapped features;
# and lpft's own loop end to end from image files with every lever on auto (compile included).
step input_gpu 480 $PY benchmarks/input_pipeline.py --parts gpu --json "$OUT/input_pipeline_gpu.json"
step probe_imagenet 240 $PY benchmarks/probe_speed.py --cases imagenet --device cuda --ref-repeats 0 \
    --json "$OUT/probe_imagenet.json"
FOLDER_TASK=$($PY -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; import tempfile; \
from conftest import write_png_task; print(write_png_task(Path(tempfile.mkdtemp()) / 'task'))")
step loop_files_auto 150 $PY -m lpft.cli run "$FOLDER_TASK" --backbone timm:resnet18 --weights random --image-size 32 \
    --method lpft --epochs 3 --augment paper --device cuda --json "$OUT/loop_files_auto.json"
# The same loop from JPEG files decoded by nvjpeg (--decode device), end to end.
JPEG_TASK=$($PY -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; import tempfile; \
from test_decode import write_jpeg_task; print(write_jpeg_task(Path(tempfile.mkdtemp()) / 'task'))")
step loop_jpegs_device 150 $PY -m lpft.cli run "$JPEG_TASK" --backbone timm:resnet18 --weights random --image-size 32 \
    --method lpft --epochs 3 --augment paper --decode device --device cuda --json "$OUT/loop_jpegs_device.json"
