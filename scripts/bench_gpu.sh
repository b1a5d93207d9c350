#!/usr/bin/env bash
# The GPU rows of the README's speed table, on one GPU (bf16 where the GPU has it). Each step is one
# `python src/bench.py` (setting and baseline interleaved in one process) or one short training run; each has its
# own time limit, so one failure does not take the others with it. Logs and the JSON lines go to $OUT
# (default logs/bench_gpu/). Run from the repository root:
#   bash scripts/bench_gpu.sh              # about 4-5 minutes on one H200 (PYTHON=... to pick the interpreter)
#   BUDGET=300 bash scripts/bench_gpu.sh   # stop starting new steps after 300 s
set -u
OUT=${OUT:-logs/bench_gpu}
PY=${PYTHON:-python}
BUDGET=${BUDGET:-560}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=0

left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME LIMIT_S COMMAND...: run it with at most LIMIT_S seconds (less when the budget is nearly spent)
step() {
  local name=$1 limit=$2
  shift 2
  local rest
  rest=$(left)
  if [ "$rest" -lt 30 ]; then echo "== $name: skipped (budget spent)"; return; fi
  [ "$limit" -gt "$rest" ] && limit=$rest
  echo "== $name (limit ${limit}s) : $*"
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep -v '^{' "$OUT/$name.log" | grep -vE 'USDT|SyncActivityProfiler|Warning|warn' | tail -60
  grep '^{' "$OUT/$name.log" | tail -1 >"$OUT/$name.json"
  echo "== $name: rc=$rc in $(($(date +%s) - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
$PY -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"

# 0. the CUDA-only tests, and bilinear upsampling by 16 of MLA-sized logits, forward + backward: resize (matrix
#    products) against F.interpolate (atomic-add backward), bf16 and fp32, in one process
step cuda_tests 90 $PY -m pytest -q -p no:cacheprovider tests/test_resize.py tests/test_speed_features.py
step resize_vs_interpolate 60 $PY - <<'PY'
import torch, torch.nn.functional as F
from setr.models.resize import resize
def ms(fn, x, n=10):
    for _ in range(3):
        fn(x).float().sum().backward()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn(x).float().sum().backward()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) / n
for dt in (torch.bfloat16, torch.float32):
    x = torch.randn(8, 150, 32, 32, device="cuda", dtype=dt, requires_grad=True)
    t0 = ms(lambda x: F.interpolate(x, scale_factor=16, mode="bilinear", align_corners=False), x)
    t1 = ms(lambda x: resize(x, scale_factor=16), x)
    print(f"{dt}: 8x150x32x32 -> 512x512 forward+backward: F.interpolate {t0:.2f} ms, resize {t1:.2f} ms, "
          f"{t0 / t1:.1f}x")
PY

# 1. SETR-MLA ViT-L/16 at 512x512 (the ADE20K row), batch 8, bf16 + fused attention against fp32 + math attention;
#    MFU and the top kernels of the training step
step mla512_bf16 150 $PY src/bench.py experiment=ade20k_mla_b8 data.batch_size=8 trainer.precision=bf16-mixed \
  'bench.image_size=[512,683]' bench.rounds=3 bench.warmup=2 bench.steps_per_round=3 bench.data_images=16 \
  bench.profile=12

# 2. sliding windows on a 1024x2048 Cityscapes image (SETR-PUP, 768 windows, stride 512): auto-batched windows
#    against one window per forward, both bf16 + fused attention (the only difference is the window batching)
step slide_1024x2048 120 $PY src/bench.py experiment=cityscapes_pup_80k data.batch_size=2 \
  trainer.precision=bf16-mixed 'bench.image_size=[1024,2048]' bench.baseline.trainer.precision=bf16-mixed \
  bench.baseline.model.encoder.fused_attn=true 'bench.skip=[ms_flip]' bench.rounds=3 bench.warmup=2 \
  bench.steps_per_round=3 bench.data_images=16

# 3. ViT-L at 768x768, batch 8, bf16: gradient checkpointing (setting) against none (baseline); peak memory
step ckpt_768_b8 120 $PY src/bench.py experiment=cityscapes_pup_80k data.batch_size=8 trainer.precision=bf16-mixed \
  model.encoder.grad_checkpointing=true bench.baseline.trainer.precision=bf16-mixed \
  bench.baseline.model.encoder.fused_attn=true 'bench.skip=[whole,slide,ms_flip,data]' bench.rounds=3 \
  bench.warmup=1 bench.steps_per_round=2

# 4. the quick start on the GPU through DDP (1 process, NCCL, SyncBatchNorm), bf16
step train_ddp_bf16 120 $PY src/train.py trainer=ddp trainer.devices=1 trainer.accelerator=gpu \
  trainer.precision=bf16-mixed logger=csv

# 5. step 1 again with model.compile=true (inductor; compiling takes most of the limit)
step mla512_compile 200 $PY src/bench.py experiment=ade20k_mla_b8 data.batch_size=8 trainer.precision=bf16-mixed \
  model.compile=true 'bench.skip=[whole,slide,ms_flip,data]' bench.rounds=3 bench.warmup=3 bench.steps_per_round=3

echo "== done in $(($(date +%s) - START)) s"
