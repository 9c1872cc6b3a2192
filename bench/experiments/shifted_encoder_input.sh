#!/usr/bin/env bash
# Which part of a shifted start keeps it on the plateau? Oracle arms of the amortized stage (issue 19 §1).
#
#   bench/experiments/shifted_encoder_input.sh DATA OUT SEED ARM
#
# DATA: one set of `bench/suite.py --quick --shifted` (OUT/data/M_n5000_..._outliers0.1); the run
# goes to OUT/ARM_MOLECULE_sSEED (and its log beside it). 14 amortized epochs, no switch, no stuck restart,
# one thread. The arms patch the engine in a worktree of 5d7633e (the patches are made against it):
#   est     today's engine, --estimate-shifts (the baseline)
#   oracle  the renderer gets each image's true shift; the encoder sees the shifted image
#   both    as oracle, and the encoder sees the image moved back by its true shift (= centred data)
#   jit05   as both, the encoder's centring off by a fixed Gaussian error, 0.5 px per axis
#   jit1    the same with 1 px per axis
#   self    --estimate-shifts; the encoder sees each image moved back by its last winning shift
#   pre     --estimate-shifts; the encoder sees each image moved back by a fixed truth-free centre
#           (centring_accuracy.py's alignment to a rotational average, low-pass 8, one round), the
#           renderer uses that centre plus the head's shift
#   ac      --estimate-shifts; the encoder also gets the autocorrelation of each blurred channel
#   gap     the rotation heads read the backbone's features averaged over positions (which do not move
#           with the particle); separate shift heads read them per position
# est and gap estimate shifts on shifted sets only, so they also run on centred sets (controls).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
data=$1 out=$2 seed=$3 arm=$4
name=${arm}_$(basename "$data" | cut -d_ -f1)_s$seed
patch=$root/bench/experiments/shifted_oracles.patch
[ "$arm" = ac ] && patch=$root/bench/experiments/encoder_autocorrelation.patch
[ "$arm" = gap ] && patch=$root/bench/experiments/encoder_pooled_rotations.patch
estimate=()  # shifts are estimated on the shifted sets only (their folders end in _outliers0.1)
[[ $(basename "$data") == *_outliers* ]] && estimate=(--estimate-shifts)
wt=$out/worktree-$(basename "$patch" .patch)
mkdir -p "$out"
exec 9>"$out/.worktree.lock"  # runs started side by side make the worktree once
flock 9
if [ ! -d "$wt" ]; then
    git -C "$root" worktree add --detach "$wt" 5d7633e >/dev/null
    git -C "$wt" apply "$patch"
fi
flock -u 9
args=(--switch never --epochs 14 --stuck-restarts 0 --threads 1 --no-progress --seed "$seed")
case $arm in
    est) args+=("${estimate[@]}") ;;
    oracle) export CRYOSPIN_ORACLE_SHIFTS=1 ;;
    both) export CRYOSPIN_ORACLE_SHIFTS=1 CRYOSPIN_ORACLE_CENTRE=1 ;;
    jit05) export CRYOSPIN_ORACLE_SHIFTS=1 CRYOSPIN_ORACLE_CENTRE=1 CRYOSPIN_ORACLE_JITTER_PX=0.5 ;;
    jit1) export CRYOSPIN_ORACLE_SHIFTS=1 CRYOSPIN_ORACLE_CENTRE=1 CRYOSPIN_ORACLE_JITTER_PX=1.0 ;;
    self) export CRYOSPIN_SELF_CENTRE=1; args+=(--estimate-shifts) ;;
    gap) export CRYOSPIN_GAP=1; args+=("${estimate[@]}") ;;
    pre)
        centres=$out/centres_$(basename "$data").pt
        "$root/.venv/bin/python" - "$data" "$centres" "$root" <<'PY'
import sys
from pathlib import Path

import torch

sys.path.insert(0, sys.argv[3] + "/bench/experiments")
from centring_accuracy import estimate_centres  # noqa: E402

from cryospin_lab.io.particles import ParticleStack  # noqa: E402

stack = ParticleStack(Path(sys.argv[1]) / "particles.star")
apix = float(stack.pixel_size_angstrom)
torch.save(estimate_centres(stack, max_shift_angstrom=8 * apix, iterations=1, lowpass_index=8), sys.argv[2])
PY
        export CRYOSPIN_SELF_CENTRE=1 CRYOSPIN_PRECENTRE=$centres; args+=(--estimate-shifts) ;;
    ac) export CRYOSPIN_AC=1; args+=(--estimate-shifts) ;;
    *) echo "unknown arm $arm" >&2; exit 2 ;;
esac
mkdir -p "$out"
cd "$wt"
"$root/.venv/bin/python" -m cryospin_lab reconstruct "$data/particles.star" --out "$out/$name" \
    --ground-truth "$data/ground_truth.mrc" "${args[@]}" > "$out/$name.log" 2>&1
grep -E "^final" "$out/$name.log"
