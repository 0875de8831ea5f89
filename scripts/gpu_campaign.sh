#!/usr/bin/env bash
# One device call's worth of GPU measurements, in priority order, each step capped so that
# a slow step cannot eat the others (a capped step keeps every point it finished: records
# are appended and fsynced one by one). Results are packed into $OUT/results.tgz.
#
# Usage on the lent GPU machine (from the repo root, with .whl carried: see docs/gpu-runbook.md):
#   bash scripts/gpu_campaign.sh LANE... [-- LANE...]...      LANE = STEP[,STEP...]
# Groups separated by `--` run one after the other; inside a group lane i runs its steps in
# order on GPU i, lanes in parallel when the machine has that many GPUs (waiting otherwise),
# so timings never share a card. `ddp` uses two GPUs: give it a group of its own.
# Caps include Triton compilation: every new (shape, dtype, precision) key compiles each
# autotune candidate of three kernels (~30 s each), so a cold step needs ~2 minutes.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# the lent machine's .git is the session's first commit: records name the code only through this
[ -n "${E2F_GIT_COMMIT:-}" ] || echo "warning: E2F_GIT_COMMIT is not set; records will name a stale commit"
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
res=/tmp/res/$gpu
mkdir -p "$res" "${OUT:-/tmp/out}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.limit --format=csv | tee "$res/nvidia-smi.csv"

step() {  # name seconds command...
    local name=$1 secs=$2; shift 2
    local t0=$SECONDS
    timeout "$secs" "$@" >"$res/$name.log" 2>&1
    echo "== $name rc=$? ($((SECONDS - t0)) s)"
    tail -n 6 "$res/$name.log"
}
B="python3 run_bench.py --device cuda --no-progress --no-report"

seeded() {  # DIR SUITE: with SEED_STORED=1, start DIR from this card's stored records and resume
    # (measures only the points reports/results/<gpu>/ lacks); prints the flag to pass
    if [ "${SEED_STORED:-0}" = 1 ] && [ -f "reports/results/$gpu/$2.jsonl" ]; then
        mkdir -p "$1" && cp "reports/results/$gpu/$2.jsonl" "$1/$2.jsonl" && echo --resume
    fi
}
gate="--suite kernel-regression --impl triton"

run_step() {
    case $1 in
        smoke) step smoke 45 $B --suite smoke --full --out "$res/smoke" ;;
        regression-save)  # a new baseline of this card (first kernel configuration only)
            step regression-base "${REGSAVE_SECS:-150}" env E2F_TRITON_AUTOTUNE=0 $B $gate --out "$res/regression-base" \
                --save-baseline "$res/baseline.json" ;;
        regression)  # first kernel configuration only (no autotuning): same config in every run
            REGSAVE_SECS=${REGSAVE_SECS:-180} run_step regression-save
            step regression-compare1 90 env E2F_TRITON_AUTOTUNE=0 $B $gate --out "$res/regression-rerun1" --compare "$res/baseline.json"
            step regression-compare2 90 env E2F_TRITON_AUTOTUNE=0 $B $gate --out "$res/regression-rerun2" --compare "$res/baseline.json" ;;
        ab)  # this tree against an old one on this machine, alternating processes (make it here with
            # `bash scripts/ab_tree.sh COMMIT` and carry _ab): AB_TREE=_ab/COMMIT, AB_SIZES, AB_ROUNDS
            if [ -z "${AB_TREE:-}" ]; then echo "ab: set AB_TREE=_ab/<commit> (scripts/ab_tree.sh)"; return; fi
            step ab "${AB_SECS:-360}" python3 -m suites.core.ab --base-tree "$AB_TREE" --rounds "${AB_ROUNDS:-2}" \
                --out "$res/ab" -- --suite kernel-tflops --impl triton --sizes "${AB_SIZES:-65536}" --device cuda ;;
        ab-gate)  # the regression gate's points (first configurations) of this tree against AB_TREE, same machine
            if [ -z "${AB_TREE:-}" ]; then echo "ab-gate: set AB_TREE=_ab/<commit> (scripts/ab_tree.sh)"; return; fi
            step ab-gate "${AB_SECS:-360}" env E2F_TRITON_AUTOTUNE=0 python3 -m suites.core.ab --base-tree "$AB_TREE" \
                --rounds "${AB_ROUNDS:-1}" --out "$res/ab-gate" -- --suite kernel-regression --impl triton --device cuda ;;
        kernel-triton) step kernel-tflops-triton 170 $B --suite kernel-tflops --full --impl triton \
                    --sizes 16384,65536 --out "$res/kernel-tflops-triton" ;;
        smoke-triton) step smoke-triton 120 $B --suite smoke --full --impl core-triton,e2former-v2 --out "$res/smoke-triton" ;;
        fwd-variants) step fwd-variants 240 python3 scripts/kernel_dev.py --out "$res/kernel-dev" --skip-check \
                    --sizes 16384 65536 --dtypes float32 bfloat16 --fwd-variants ;;
        fwd-groups)  # forward configurations (FWD_VARIANTS, space-separated) against the default, the first one
            # shellcheck disable=SC2086  # one argument per variant
            step fwd-groups "${GROUPS_SECS:-240}" python3 scripts/kernel_dev.py --out "$res/kernel-dev" --skip-check \
                --value-layouts padded --sizes 16384 65536 --dtypes float32 bfloat16 --fwd-variants \
                ${FWD_VARIANTS:-GROUPS=2 GROUPS=2,HC=8 GROUPS=2,HC=8,maxnreg=128 GROUPS=2,HC=8,num_warps=8,maxnreg=128} ;;
        bwd-configs)  # every backward configuration at K = 64 (and 32), one process each, against chunked
            step bwd-configs "${BWDCFG_SECS:-240}" python3 scripts/bwd_config_check.py --out "$res/kernel-dev" \
                --k ${BWDCFG_K:-64} --no-mma-v3 ${BWDCFG_FLAGS:-} ;;
        leak-v2)  # what keeps ~60 GiB allocated after E2Former-V2's forward runs out of memory (80 GB cards)
            step leak-v2 "${LEAK_SECS:-120}" $B --suite memory-scaling --full --impl e2former-v2 --sizes 65536,1024 \
                --out "$res/leak-v2" ;;
        probe)  # forward time split (no value gathers / no gate products) and a profiler breakdown of fwd+bwd
            step probe "${PROBE_SECS:-150}" python3 scripts/kernel_dev.py --out "$res/kernel-dev" --skip-check --sizes \
                --probe ${PROBE_SIZES:-16384} ;;
        moment-probe)  # the forward's aggregation kernels alone: 29-row values against the moments of 18-number rows
            for dt in float32 bfloat16; do
                step "moment-probe-$dt" "${MOMENT_SECS:-120}" python3 scripts/moment_agg_probe.py --out "$res/moment-agg.jsonl" \
                    --sizes ${MOMENT_SIZES:-16384 65536} --dtype "$dt"
            done ;;
        big-check)  # triton against chunked at N = 65,536, forward and every gradient (fp32, TF32 off)
            step big-check "${BIGCHECK_SECS:-150}" env E2F_TRITON_AUTOTUNE=0 python3 scripts/kernel_dev.py --out "$res/kernel-dev" \
                --skip-check --sizes --value-layouts padded --big-check ;;
        big-check-moments)  # the same for the moments form (CoreInputs.moments)
            step big-check-moments "${BIGCHECK_SECS:-150}" env E2F_TRITON_AUTOTUNE=0 python3 scripts/kernel_dev.py \
                --out "$res/kernel-dev" --skip-check --sizes --value-layouts padded --big-check --moments ;;
        profile-v2) step profile-v2 120 python3 scripts/profile_model.py --model e2former-v2 --n 1000 --out "$res/profile-v2.json" ;;
        latency-v2) step latency-v2 200 $B --suite latency --full --impl e2former-v2 --sizes 1000,10000 --out "$res/latency-v2" ;;
        memory-triton) step memory-triton "${MEMTRITON_SECS:-240}" env E2F_TRITON_AUTOTUNE=0 $B --suite memory-scaling --full --impl core:triton \
                    --sizes "${MEMTRITON_SIZES:-1024,16384,65536,262144,1048576}" --out "$res/memory-triton" ;;
        kernel) step kernel-tflops "${KERNEL_SECS:-150}" $B --suite kernel-tflops --full --impl "${KERNEL_IMPLS:-triton,materialized,sdpa-dense}" \
                    --sizes "${KERNEL_SIZES:-4096,16384,65536}" --out "$res/kernel-tflops" ;;
        twin)  # E2Former-V2's force-training step against the second order's block size, v1 beside it
            step twin "${TWIN_SECS:-300}" python3 scripts/twin_blocks.py --out "$res/twin-blocks.jsonl" --sizes 1000 4000 \
                --blocks 250 auto --steps 3 ;;
        ncu-fwd)  # hardware counters of one forward (Firecracker machines; clocks left alone): the fused
            # kernel's launch, or with the split form the logits and the aggregation kernels of one chunk
            step ncu-fwd "${NCU_SECS:-150}" ncu --clock-control none -k regex:fwd_ -c 2 \
                --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
                --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
                --section SourceCounters --section MemoryWorkloadAnalysis_Tables \
                env E2F_TRITON_AUTOTUNE=0 E2F_TRITON_FWD_STASH_BYTES=${NCU_STASH_BYTES:-1073741824} \
                python3 scripts/kernel_dev.py --out "$res/ncu" --value-layouts padded --ncu-fwd 16384 ;;
        ncu-bwd)  # hardware counters of the six backward kernels of the first target chunk (first configurations)
            step ncu-bwd "${NCU_SECS:-200}" ncu --clock-control none -k "regex:bwd_(edge|value|target|gate|radial_table|source)_kernel" -c 6 \
                --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
                --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
                env E2F_TRITON_AUTOTUNE=0 python3 scripts/kernel_dev.py --out "$res/ncu" --value-layouts padded \
                --ncu-bwd "${NCU_N:-65536}" ;;
        regression-vs)  # the committed baseline of this card against this code; saves a new baseline
            step regression-vs "${REGVS_SECS:-270}" env E2F_TRITON_AUTOTUNE=0 $B $gate --out "$res/regression-new" \
                --compare "reports/baselines/${BASELINE_NAME:-h200}.json" --allow-mismatch --save-baseline "$res/baseline.json"
            step regression-compare1 "${REGCMP_SECS:-150}" env E2F_TRITON_AUTOTUNE=0 $B $gate --out "$res/regression-rerun1" --compare "$res/baseline.json" ;;
        radial-cost)  # what a tabulated radial layer could save: the kernels at R = 256 and at RADIAL_R (one chunk of
            # the radial loop), N = 65,536, autotuned (per-kernel timings in each record's config)
            for r in 256 ${RADIAL_R:-32}; do
                step "radial-r$r" "${RADIAL_SECS:-150}" python3 scripts/kernel_dev.py --out "$res/kernel-dev" --skip-check \
                    --no-materialized --sizes 65536 --value-layouts padded --num-rbf "$r"
            done ;;
        memory-big)  # issue 4's largest points: core:triton fwd at 1,048,576 and fwd+bwd at 524,288
            step memory-big "${MEMBIG_SECS:-200}" env E2F_TRITON_AUTOTUNE=0 $B --suite memory-scaling --full --impl core:triton \
                --sizes 524288,1048576 --out "$res/memory-big" ;;
        memory-1m)  # issue 4's forward at 1,048,576 atoms alone (the host draws ~40 GB of inputs first)
            step memory-1m "${MEM1M_SECS:-300}" env E2F_TRITON_AUTOTUNE=0 $B --suite memory-scaling --full --impl core:triton \
                --sizes 1048576 --out "$res/memory-1m" ;;
        memory-k)  # fwd and fwd+bwd peak bytes for K = 16 and 64 from 1,024 to 262,144 atoms
            step memory-k "${MEMK_SECS:-150}" env E2F_TRITON_AUTOTUNE=0 python3 scripts/kernel_dev.py --out "$res/kernel-dev-k" \
                --skip-check --sizes --value-layouts padded --mem-sizes 1024 16384 65536 262144 --mem-k ${MEMK_K:-16 64} ;;
        kernel-layouts)  # v contiguous vs padded head rows, same inputs, first configuration only
            step kernel-layouts "${LAYOUT_SECS:-300}" env E2F_TRITON_AUTOTUNE=0 python3 scripts/kernel_dev.py \
                --out "$res/kernel-dev" --skip-check --value-layouts contiguous padded --sizes 16384 65536 --dtypes float32
            step kernel-layouts-bf16 "${LAYOUT_BF16_SECS:-120}" env E2F_TRITON_AUTOTUNE=0 python3 scripts/kernel_dev.py \
                --out "$res/kernel-dev" --skip-check --value-layouts padded --sizes 65536 --dtypes bfloat16 --no-materialized ;;
        latency) step latency "${LATENCY_SECS:-240}" $B --suite latency --full --sizes 1000,10000 --out "$res/latency" \
                    $(seeded "$res/latency" latency) ;;
        memory) step memory "${MEMORY_SECS:-90}" $B --suite memory-scaling --full --sizes 1024,16384,65536 \
                    --impl core:triton,core:chunked,core:materialized,e2former-v2,e2former-v1,escn-md,dense-tp \
                    --out "$res/memory-scaling" $(seeded "$res/memory-scaling" memory-scaling) ;;
        lmax) step lmax "${LMAX_SECS:-400}" $B --suite lmax-sweep --full --sizes 1000 --lmax 1-6 --out "$res/lmax-sweep" \
                    $(seeded "$res/lmax-sweep" lmax-sweep) ;;
        accuracy)  # every model in its own process on this lane's GPU, in the background (the
                   # lane goes on; wall times share the card). First kernel configuration only:
                   # every batch has a new atom count, autotuning them would dominate.
            for m in ${ACC_MODELS:-element-mean e2former-v2 e2former-v1 escn-md dense-tp e2former-v2-backends}; do
                # --time-budget stops training in time to evaluate and record (the cap would lose it)
                step "accuracy-$m" "${ACC_SECS:-300}" env E2F_TRITON_AUTOTUNE=0 $B --suite accuracy --full --impl "$m" \
                    --steps "${ACC_STEPS:-600}" --time-budget $(( ${ACC_SECS:-300} - 90 )) --out "$res/accuracy-$m" &
            done ;;
        ddp)  # force training on two GPUs through torchrun (NCCL), the shipped set
            step ddp 100 env CUDA_VISIBLE_DEVICES=0,1 E2F_TRITON_AUTOTUNE=0 torchrun --standalone --nproc_per_node=2 \
                -m e2f.train --model e2former-v2 --preset small --steps 60 --log-every 10 --eval-every 0 --out "$res/ddp"
            rm -f "$res/ddp/checkpoint.pt" ;;
        *) echo "unknown step $1" ;;
    esac
}

ngpu=$(nvidia-smi -L | wc -l)
run_group() {  # lanes in parallel, lane i on GPU i (mod the GPU count, waiting when they wrap)
    local lane=0
    for arg in "$@"; do
        (
            export CUDA_VISIBLE_DEVICES=$((lane % ngpu))
            for s in ${arg//,/ }; do run_step "$s"; done
            wait  # steps this lane started in the background
        ) &
        [ $(((lane + 1) % ngpu)) -eq 0 ] && wait
        lane=$((lane + 1))
    done
    wait
}
group=()
for arg in "$@"; do
    if [ "$arg" = "--" ]; then run_group "${group[@]}"; group=(); else group+=("$arg"); fi
done
[ ${#group[@]} -gt 0 ] && run_group "${group[@]}"
tar czf "${OUT:-/tmp/out}/results.tgz" -C /tmp/res .
