#!/usr/bin/env bash
# One-GPU checks in one go, each step bounded by `timeout`:
#   tests    the GPU tests of the project's kernels and of the passes that put them in (Triton kernels against their
#            references, eager and compiled; llama_tiny artifacts with each fusion against a full recompute);
#   gloo     verify tp=2 with both ranks on the one GPU over gloo, backend eager and inductor
#            (host-staged collectives);
#   aoti     verify tp=1 of an AOTInductor CUDA engine against the unsharded model;
#   cold     compile, cold start and latency at tp=1 of aoti next to inductor_cudagraphs (compile_time.py);
#   probe    the kept aoti package loaded four ways in their own processes (aoti_probe.py), and once without
#            the libstdc++ preload (lower/aoti.worker_env) to show the crash it avoids.
# usage: [STEPS="tests gloo aoti cold probe"] benchmarks/tools/gpu_checks.sh OUT_DIR   (records and logs land in OUT_DIR)
set -u
out=${1:?usage: benchmarks/tools/gpu_checks.sh OUT_DIR}
steps=" ${STEPS:-tests gloo aoti cold probe} "
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
if [[ $steps == *" tests "* ]]; then
    step gpu_tests 420 python -m pytest -p no:warnings -rA tests/passes/test_one_row_linear.py \
        tests/passes/test_decode_attention.py tests/passes/test_fuse_rope.py \
        -k "(gpu or cuda or inductor_makes) and not (artifact and inductor)"
fi
if [[ $steps == *" gloo "* ]]; then
    for be in eager inductor; do
        TPCOMPILE_INDUCTOR_OPTIONS=$no_cd step "verify_gloo_$be" 240 python -m tpcompile.cli verify tp=2 \
            runtime.device=cuda runtime.collectives=gloo backend=$be out_dir=$work/verify hydra.run.dir=$work/h_$be
    done
fi
if [[ $steps == *" aoti "* ]]; then
    TPCOMPILE_INDUCTOR_OPTIONS=$no_cd step verify_aoti 300 python -m tpcompile.cli verify tp=1 runtime.device=cuda \
        backend=aoti out_dir=$work/verify hydra.run.dir=$work/h_aoti
fi
if [[ $steps == *" cold "* ]]; then
    step compile_time 420 python benchmarks/compile_time.py --device cuda --dtype bfloat16 --tps 1 --start-tp 1 \
        --backends aoti,inductor_cudagraphs --keep "$work/compile" --out "$out/compile_aoti_cold.json"
fi
if [[ $steps == *" probe "* ]]; then
    package=$(dirname "$(ls "$work"/compile/aoti/*/manifest.json "$work"/verify/*/forward.pt2 2>/dev/null | head -n 1)")
    step aoti_probe 300 python benchmarks/tools/aoti_probe.py "$package" --device cuda:0 --out "$out/aoti_probe.json"
    step aoti_probe_no_preload 120 python benchmarks/tools/aoti_probe.py "$package" --device cuda:0 --ways copy \
        --no-preload --out "$out/aoti_probe_no_preload.json"
fi
for f in "$work"/*.log; do echo "#### $f"; tail -n 60 "$f"; done >"$out/logs.txt"
