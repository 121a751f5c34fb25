#!/usr/bin/env bash
# The one prepared GPU check (device machine, ~10 minutes): the paper model's training-speed
# levers first (eager bf16 batch 24 vs torch.compile + batch 64 + fused AdamW), then the CUDA
# path end to end, paper-model step timing, and the study grid at the `cpu` budget with runs in
# parallel.
#   bash bench/gpu_session.sh OUT_DIR [SWEEP_SECONDS]
# Budget (the last H200 session: steps 1-2 took ~2 min, the sweep its full timeout): step 0
# ~2-3 min (mostly compiling R50-ViT-B/16's forward + backward; capped at 240 s so a slow
# compile cannot eat the session: the eager rows print before it), steps 1-2 ~2 min, step 3
# SWEEP_SECONDS (default 300, was 400), collection < 30 s: ~10 minutes.
# Needs: torch with CUDA, timm; segmentation-models-pytorch, nibabel, pydicom, medpy (wheels in
# .whl/ are installed into /tmp/site when present).
set -uo pipefail
out=${1:?usage: bash bench/gpu_session.sh OUT_DIR [SWEEP_SECONDS]}
sweep_seconds=${2:-300}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, timm, segmentation_models_pytorch as smp; print('torch', torch.__version__, 'timm', timm.__version__, 'smp', smp.__version__)"
  echo "== 0. training-speed levers, paper model (bf16, channels_last)"
  timeout 240 python3 bench/bench_cuda.py --suite=speedup --batch=64 --steps=20 2>&1
  echo "exit $?"
  echo "== 1. CUDA path: main.py --preset=tiny (AMP bf16, channels_last) + test.py"
  python3 main.py --preset=tiny --out_dir=/tmp/gpu/runs --run_name=tiny --cache_dir=/tmp/gpu/cache 2>&1 | grep -v "it/s\|study/s" | tail -25
  echo "exit ${PIPESTATUS[0]}"
  grep -o '"device": "[^"]*"' /tmp/gpu/runs/tiny/config.json | head -2
  python3 test.py --run_dir=/tmp/gpu/runs/tiny --tta=True 2>&1 | grep -v "study/s" | tail -5
  echo "== 2. step timing, paper setting"
  python3 bench/bench_cuda.py --suite=models --steps=15 2>&1
} 2>&1 | tee "$out/cuda_check.txt"
echo "== 3. study grid, cpu budget, 8 runs at a time" | tee "$out/sweep.txt"
timeout "$sweep_seconds" python3 sweep.py --grid=study --budget=cpu --parallel=8 --num_workers=1 \
  --runs_dir=/tmp/gpu/study --results_dir="$out/results" --cache_dir=/tmp/gpu/cache 2>&1 \
  | grep -v "it/s\|study/s" | tee -a "$out/sweep.txt"
# the leaderboard, and the per-run evidence behind every number (no weights, no predictions)
python3 sweep.py --grid=study --budget=cpu --collect_only --runs_dir=/tmp/gpu/study \
  --results_dir="$out/results" --export="$out/runs" 2>&1 | tail -2 | tee -a "$out/sweep.txt"
ls -la "$out" "$out/results"/* 2>/dev/null
