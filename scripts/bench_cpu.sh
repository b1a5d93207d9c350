#!/usr/bin/env bash
# The CPU rows of docs/speed.md and benchmarks/README.md, on this machine: each step through benchmarks/record.py,
# which writes $RESULTS/cpu_<step>.json (the step's final JSON line with the CPU model, torch / timm / Lightning
# versions, git commit, UTC date, exact command and the load average before and after). Measure on an idle
# machine with a clean checkout (the files record `git_dirty` and the load). About 40 minutes on 2 cores in all;
# run from the repository root (after `make install`; the peers steps need `make peers`):
#   bash scripts/bench_cpu.sh
#   ONLY="peers_vitb_mla_512 vitb_mla_512_train" bash scripts/bench_cpu.sh   # run only the steps named
set -u
KIND=cpu PY=${PYTHON:-.venv/bin/python} BUDGET=${BUDGET:-3600}
. "$(dirname "$0")/bench_lib.sh"
VITB="bench.device=cpu model/encoder=vit_base model.encoder.pretrained=none data.batch_size=2"

# 1. the peer: mmsegmentation 1.2.2's SETR-MLA (its ADE20K config, ViT-B/16) against this project on the same
#    weights, fp32 (mmseg's --amp needs a GPU), training and inference, 512 and 256
recorded peers_vitb_mla_512 900 "$PY" benchmarks/peers.py --device cpu --encoder vit_b --crop 512 --batch 2 \
  --steps 2 --rounds 3 --warmup 1
recorded peers_vitb_mla_256 600 "$PY" benchmarks/peers.py --device cpu --encoder vit_b --crop 256 --batch 2 \
  --steps 3 --rounds 3 --warmup 1

# 2. ViT-B 512 MLA batch 2 training step against bench's baseline, and where the step's time goes: the share
#    outside matrix products and attention (profile.split)
# shellcheck disable=SC2086
recorded vitb_mla_512_train 900 "$PY" src/bench.py $VITB model=setr_mla data.crop_size=512 bench.rounds=3 \
  bench.steps_per_round=2 bench.warmup=1 'bench.skip=[whole,slide,ms_flip,data]' bench.profile=400

# 2b. the same with 150 classes (data=ade20k's network and loss, random inputs): the profile split of docs/speed.md
#     ("Where a CPU training step goes"). Its "before" row ran the same command at baa867f in a worktree
#     (git worktree add /tmp/before baa867f; cd /tmp/before; PYTHONPATH=src ... record.py
#     cpu_vitb_mla_512_ade20k_profile_before ...), and benchmarks/profile_split.py derives that file's split
# shellcheck disable=SC2086
recorded vitb_mla_512_ade20k_profile 900 "$PY" src/bench.py $VITB data=ade20k model=setr_mla data.crop_size=512 \
  bench.rounds=3 bench.steps_per_round=2 bench.warmup=1 'bench.skip=[whole,slide,ms_flip,data]' bench.profile=400
if [ -f "$RESULTS/cpu_vitb_mla_512_ade20k_profile_before.json" ]; then
  recorded vitb_mla_512_ade20k_profile_before_split 60 "$PY" benchmarks/profile_split.py \
    "$RESULTS/cpu_vitb_mla_512_ade20k_profile_before.json"
fi

# 3. the 256 rows: each head fp32, MLA bf16, the small default model, the resize micro-benchmark, the data pipeline
for head in mla naive pup; do
  # shellcheck disable=SC2086
  recorded vitb_${head}_256 600 "$PY" src/bench.py $VITB model=setr_$head data.crop_size=256 bench.rounds=3 \
    bench.steps_per_round=3 'bench.skip=[ms_flip,data]'
done
# shellcheck disable=SC2086
recorded vitb_mla_256_bf16 600 "$PY" src/bench.py $VITB model=setr_mla data.crop_size=256 \
  trainer.precision=bf16-mixed bench.rounds=3 bench.steps_per_round=3 'bench.skip=[ms_flip,data]'
recorded setr_small 400 "$PY" src/bench.py bench.device=cpu bench.rounds=3 bench.steps_per_round=3
recorded resize_vs_interpolate 120 "$PY" benchmarks/resize_vs_interpolate.py --device cpu --batch 8 --size 16 \
  --steps 5 --warmup 2
recorded data_speed 120 "$PY" -m setr.data.speed ade20k cityscapes --num-images 20

echo "== done in $(($(date +%s) - START)) s; result files: $RESULTS/cpu_*.json (logs in $OUT)"
