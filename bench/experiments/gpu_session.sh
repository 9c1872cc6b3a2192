#!/usr/bin/env bash
# One device-tool session (GPU): CUDA tests, throughput (mixed precision on/off), switch-time sweep.
# Needs the wheels the GPU image lacks in .whl/ (ignored; name it in the device tool's `carry`):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl mrcfile starfile gemmi healpy astropy pyerfa \
#     astropy-iers-data torch-ctf torch-fourier-slice torch-fourier-shell-correlation torch-grid-utils \
#     torch-image-interpolation
# Writes to $OUT: gpu.txt, pytest.log, throughput.log, sweep_*.log (one JSON line per epoch).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
# The default set, simulated on the CPU while the tests use the GPU.
python3 -c "from cryospin_lab import datasets; datasets.hsp90(cache_dir='/tmp/cache', progress=False)" \
    > "$OUT/simulate.log" 2>&1 &
SIM=$!
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_projection.py 2>&1 | tee "$OUT/pytest.log"
wait $SIM || { cat "$OUT/simulate.log"; exit 1; }
python3 bench/throughput.py --device cuda --sizes 64 128 --presets light paper --autocast off bf16 \
    --repeats 9 --images 256 2>&1 | tee "$OUT/throughput.log"
# Switch-time sweep: same seed, switch at fixed epochs, auto, and never; all in parallel on the GPU.
S="python3 bench/experiments/amortized_sweep.py --cache /tmp/cache --device cuda --modulo-two-fold"
S="$S --epochs ${EPOCHS:-30} --budget-s ${BUDGET:-300}"
for rule in ${RULES:-auto never 8 12 16 20 24}; do
    OMP_NUM_THREADS=2 $S --name "switch_$rule" --switch "$rule" > "$OUT/sweep_$rule.log" 2>&1 &
done
wait
for f in "$OUT"/sweep_*.log; do echo "== $f"; tail -n 2 "$f"; done
