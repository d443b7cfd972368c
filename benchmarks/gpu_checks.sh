#!/usr/bin/env bash
# One-GPU checks for one device call (issues 6 and 7), each step bounded by `timeout`:
#   1. verify tp=2 with both ranks on the one GPU over gloo, backend eager and inductor (host-staged collectives);
#   2. aoti for CUDA: compile, cold start and latency at tp=1, next to inductor_cudagraphs (compile_time.py);
#   3. the kept aoti package loaded four ways, each in its own process (aoti_probe.py).
# usage: benchmarks/gpu_checks.sh OUT_DIR      (records and logs land in OUT_DIR; engines in outputs/gpu_checks)
set -u
out=${1:?usage: benchmarks/gpu_checks.sh OUT_DIR}
work=outputs/gpu_checks
mkdir -p "$out" "$work"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: log to $work/NAME.log, exit status to $out/summary.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" >"$work/$name.log" 2>&1
    echo "$name rc=$?" | tee -a "$out/summary.txt"
    tail -n 4 "$work/$name.log"
}

no_cd='{"coordinate_descent_tuning": false}'  # verify checks numbers, not speed: skip the tuning's compile time
for be in eager inductor; do
    TPCOMPILE_INDUCTOR_OPTIONS=$no_cd step "verify_gloo_$be" 240 python -m tpcompile.cli verify tp=2 \
        runtime.device=cuda runtime.collectives=gloo backend=$be out_dir=$work/verify hydra.run.dir=$work/hydra_$be
done
step compile_time 420 python benchmarks/compile_time.py --device cuda --dtype bfloat16 --tps 1 --start-tp 1 \
    --backends aoti,inductor_cudagraphs --keep "$work/compile" --out "$out/compile_aoti_cold.json"
package=$(dirname "$(ls "$work"/compile/aoti/*/manifest.json | head -n 1)")
step aoti_probe 300 python benchmarks/aoti_probe.py "$package" --device cuda:0 --out "$out/aoti_probe.json"
for f in "$work"/*.log; do echo "#### $f"; tail -n 60 "$f"; done >"$out/logs.txt"
