#!/usr/bin/env bash
# A tp sweep of the decode benchmark, then its report (report.md, report.csv, *.png in the sweep dir).
#   examples/sweep.sh [SWEEP_DIR]
#   TP=1,2,4 BACKENDS=eager,inductor NEW_TOKENS=64 examples/sweep.sh outputs/sweeps/tp
# Each point is one job with its own tp worker processes (Hydra's basic launcher: one after another);
# add hydra/launcher=slurm to EXTRA for one Slurm job per point (docs/guide.md, "Sweeps and Slurm").
set -euo pipefail
SWEEP_DIR=${1:-outputs/sweeps/example}
tpcompile bench -m "tp=${TP:-1,2}" "backend=${BACKENDS:-eager}" "bench.new_tokens=${NEW_TOKENS:-8}" \
    "bench.profile_steps=${PROFILE_STEPS:-2}" "hydra.sweep.dir=$SWEEP_DIR" ${EXTRA:-}
tpcompile report "$SWEEP_DIR"
