#!/usr/bin/env bash
# Amortized-stage sweep on one GPU (device tool): 5 configurations in parallel, logs to $OUT.
# The GPU image lacks mrcfile/starfile/gemmi: fetch their wheels first into .whl/ (ignored; pass it
# in the device tool's `carry`):
#   .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .whl mrcfile starfile gemmi
# The sweep behind the encoder learning rate and the disc ramp (docs/decisions.md#encoder-lr).
set -u
pip install -q --no-deps --target /tmp/pk .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/pk OMP_NUM_THREADS=3
python3 -c "from cryospin_lab import datasets; datasets.hsp90(cache_dir='/tmp/cache', progress=False)" || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
S="python3 bench/experiments/amortized_sweep.py --cache /tmp/cache --device cuda --epochs 40 --budget-s ${BUDGET:-190}"
$S --name base --encoder-lr 1e-4 --radius-ramp 3 > $OUT/base.log 2>&1 &
$S --name enc1e-3 --encoder-lr 1e-3 --radius-ramp 3 > $OUT/enc1e-3.log 2>&1 &
$S --name enc1e-3_ramp12 --encoder-lr 1e-3 --radius-ramp 12 > $OUT/enc1e-3_ramp12.log 2>&1 &
$S --name enc3e-4_dec1e-2_ramp12 --encoder-lr 3e-4 --decoder-lr 1e-2 --radius-ramp 12 > $OUT/enc3e-4_dec1e-2_ramp12.log 2>&1 &
$S --name semi_auto --encoder-lr 1e-3 --radius-ramp 12 --switch auto --epochs 24 > $OUT/semi_auto.log 2>&1 &
wait
tail -n 3 $OUT/*.log
