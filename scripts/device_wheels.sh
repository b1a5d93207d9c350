#!/usr/bin/env bash
# The project's runtime dependencies that the lent GPU machines' image lacks (hydra-core, omegaconf, albumentations
# and what they need; its torch, timm, Lightning, torchmetrics, OpenCV, numpy and scipy are used as they are;
# wandb is imported only by logger=wandb, which no benchmark uses), as CPython wheels in .whl/ (git-ignored), made
# here where pip reaches PyPI. scripts/bench_gpu.sh installs them from there on a machine without network
# (pip --no-index --target), and the peer (benchmarks/peers/) installs from its own committed wheels.
#   bash scripts/device_wheels.sh              # CPython 3.12 (the GPU image's), versions of constraints.txt
#   PYVER=3.11 bash scripts/device_wheels.sh
set -eu
DEST=${DEST:-.whl}
PYVER=${PYVER:-3.12}
PIP=${PIP:-python3 -m pip}
mkdir -p "$DEST"
pin() { grep -i -E "^$1==" constraints.txt | head -1; }
PLATS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
       --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# shellcheck disable=SC2046
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${PLATS[@]}" \
  -d "$DEST" $(for p in hydra-core omegaconf albumentations albucore simsimd stringzilla pydantic pydantic_core \
               annotated-types typing-inspection; do pin "$p"; done)
# antlr4-python3-runtime 4.9.3 (omegaconf's parser runtime) is published as a source archive only: a pure-Python wheel
$PIP wheel -q --no-deps -w "$DEST" "$(pin antlr4-python3-runtime)"
ls "$DEST"
