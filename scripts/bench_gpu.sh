#!/usr/bin/env bash
# The GPU rows of docs/speed.md, on one GPU (bf16 where the GPU has it). Each step is one `python src/bench.py`
# (setting and baseline interleaved in one process), one script of benchmarks/ or one short training run; each has
# its own time limit, so one failure does not take the others with it. Every measuring step runs through
# benchmarks/record.py, which writes $RESULTS/gpu_<step>.json (default benchmarks/results/: the step's final JSON
# line with the GPU name, driver, torch / timm / Lightning versions, git commit, UTC date, exact command and load;
# commit those files: docs/speed.md names them and tests/test_speed_results.py checks them) and copies it to $OUT.
# Each step's log (and its bare JSON line) goes to $OUT (default logs/bench_gpu/). Run from the repository root:
#   bash scripts/bench_gpu.sh              # at most 9 minutes on one GPU (PYTHON=... to pick the interpreter)
#   BUDGET=300 bash scripts/bench_gpu.sh   # stop starting new steps after 300 s (default 540: 9 minutes in all)
#   ONLY="mla512_bf16 ckpt_768_b8" bash scripts/bench_gpu.sh   # run only the steps named
set -u
KIND=gpu PY=${PYTHON:-python} BUDGET=${BUDGET:-540}
. "$(dirname "$0")/bench_lib.sh"

# a machine without network and without the project installed (the lent GPU machines): src/ on the path, and the
# dependencies its image lacks from .whl/ (made here by scripts/device_wheels.sh; carried with the checkout)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import hydra, omegaconf, albumentations" 2>/dev/null; then
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/setr_site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/setr_site"
  else
    echo "error: $PY lacks hydra-core / omegaconf / albumentations and there is no .whl/ (bash scripts/device_wheels.sh)"
    exit 2
  fi
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
"$PY" -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"

# The steps, most wanted first (when the budget runs out, the last ones are skipped and say so): the loss path,
# the MLA row with MFU and profile, the fused loss and compile against their baselines, the peer, PUP 768
# 2. the training loss path alone (8 x 150 x 32 x 32 logits, 512 x 512 labels, bf16): reference against fused
recorded loss_path 60 "$PY" benchmarks/loss_path.py --device cuda --dtype bfloat16 --batch 8

# 3. SETR-MLA ViT-L/16 at 512x512 (the ADE20K row), batch 8, bf16 + fused attention against fp32 + math attention;
#    MFU and the top kernels of the training step
recorded mla512_bf16 150 "$PY" src/bench.py experiment=ade20k_mla_b8 data.batch_size=8 \
  trainer.precision=bf16-mixed 'bench.image_size=[512,683]' bench.rounds=3 bench.warmup=2 bench.steps_per_round=3 \
  bench.data_images=16 bench.profile=12

# 4. the same training step, both bf16 + fused attention + matmul resizing: the fused loss path (setting) against
#    model.loss_path=reference (baseline); speed, MFU and peak memory
recorded mla512_loss_path 100 "$PY" src/bench.py experiment=ade20k_mla_b8 data.batch_size=8 \
  trainer.precision=bf16-mixed bench.baseline.trainer.precision=bf16-mixed \
  bench.baseline.model.encoder.fused_attn=true bench.baseline.model.resize=matmul \
  bench.baseline.model.loss_path=reference 'bench.skip=[whole,slide,ms_flip,data]' bench.rounds=3 bench.warmup=1 \
  bench.steps_per_round=3

# 4b. the peer, side by side in one process (benchmarks/peers.py; README there): mmsegmentation 1.2.2's SETR-MLA
#    ViT-L/16 from its ADE20K config, fp32 and --amp (float16, dynamic loss scale), against this project on the same
#    converted weights (fp32 and bf16-mixed); training images/s, peak memory, whole and slide inference
"$PY" benchmarks/peers/install.py --site "${PEERS_SITE:-/tmp/setr_peers_site}" >/dev/null \
  && export SETR_PEERS_SITE="${PEERS_SITE:-/tmp/setr_peers_site}"
recorded peers_mla512 150 "$PY" benchmarks/peers.py --config setr_vit-l_mla_8xb2-160k_ade20k-512x512 \
  --encoder vit_l --crop 512 --batch 8 --device cuda --precisions fp32,amp --steps 3 --rounds 3 --warmup 2

# 5. step 3's training step with model.compile=true (inductor; compiling takes most of the limit) against the same
#    without compile (both bf16 + fused attention + matmul resizing + the fused loss): the ratio is compile's alone
recorded mla512_compile 200 "$PY" src/bench.py experiment=ade20k_mla_b8 data.batch_size=8 \
  trainer.precision=bf16-mixed model.compile=true bench.baseline.trainer.precision=bf16-mixed \
  bench.baseline.model.encoder.fused_attn=true bench.baseline.model.resize=matmul bench.baseline.model.loss_path=fused \
  'bench.skip=[whole,slide,ms_flip,data]' bench.rounds=3 bench.warmup=3 bench.steps_per_round=3

# 5b. compile with the reference loss path (model.loss_path=reference) in both: compile's ratio without the fused loss
recorded mla512_compile_reference 200 "$PY" src/bench.py experiment=ade20k_mla_b8 data.batch_size=8 \
  trainer.precision=bf16-mixed model.compile=true model.loss_path=reference bench.baseline.trainer.precision=bf16-mixed \
  bench.baseline.model.encoder.fused_attn=true bench.baseline.model.resize=matmul \
  'bench.skip=[whole,slide,ms_flip,data]' bench.rounds=3 bench.warmup=3 bench.steps_per_round=3

# 5c. the peer at 768x768: SETR-PUP ViT-L/16 (its Cityscapes config's network with ADE20K's 150 classes is not
#    shipped; the ADE20K PUP config at 768), batch 8, fp32 and --amp against this project
recorded peers_pup768 150 "$PY" benchmarks/peers.py --config setr_vit-l_pup_8xb2-160k_ade20k-512x512 \
  --encoder vit_l --crop 768 --batch 8 --device cuda --precisions fp32,amp --steps 2 --rounds 3 --warmup 1

# 6. ViT-L at 768x768, batch 8, bf16: gradient checkpointing (setting) against none (baseline); peak memory
recorded ckpt_768_b8 120 "$PY" src/bench.py experiment=cityscapes_pup_80k data.batch_size=8 \
  trainer.precision=bf16-mixed model.encoder.grad_checkpointing=true bench.baseline.trainer.precision=bf16-mixed \
  bench.baseline.model.encoder.fused_attn=true 'bench.skip=[whole,slide,ms_flip,data]' bench.rounds=3 \
  bench.warmup=1 bench.steps_per_round=2

# 7. sliding windows on a 1024x2048 Cityscapes image (SETR-PUP, 768 windows, stride 512): auto-batched windows
#    against one window per forward, both bf16 + fused attention (the only difference is the window batching)
recorded slide_1024x2048 120 "$PY" src/bench.py experiment=cityscapes_pup_80k data.batch_size=2 \
  trainer.precision=bf16-mixed 'bench.image_size=[1024,2048]' bench.baseline.trainer.precision=bf16-mixed \
  bench.baseline.model.encoder.fused_attn=true 'bench.skip=[ms_flip]' bench.rounds=3 bench.warmup=2 \
  bench.steps_per_round=3 bench.data_images=16

# 8. the quick start on the GPU through DDP (1 process, NCCL, SyncBatchNorm), bf16 (the file's wall_s is the
#    whole run's time, start-up included)
recorded train_ddp_bf16 120 "$PY" src/train.py trainer=ddp trainer.devices=1 trainer.accelerator=gpu \
  trainer.precision=bf16-mixed logger=csv

# last (they are not this release's rows): 0. the CUDA-only tests
step cuda_tests 90 "$PY" -m pytest -q -p no:cacheprovider tests/models/test_resize.py tests/models/test_speed_features.py \
  tests/training/test_loss_path.py

# 1. bilinear upsampling by 16 of MLA-sized logits (8 x 150 x 32 x 32 -> 512 x 512), forward + backward: resize
#    (matrix products) against F.interpolate (atomic-add backward), bf16 and fp32, in one process
recorded resize_vs_interpolate 60 "$PY" benchmarks/resize_vs_interpolate.py --device cuda

echo "== done in $(($(date +%s) - START)) s; result files: $RESULTS/gpu_*.json (copies in $OUT)"
