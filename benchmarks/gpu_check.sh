#!/usr/bin/env bash
# A session's first device call in one command: install the carried wheels (zstandard, gguf, platformdirs are
# not in the device image), check the kernels the last session changed, then print the timing tables.
#
#   bash benchmarks/gpu_check.sh [tests] [configs] [kernels] [decode] [tune] [ncu]   (device tool, carry [".whl"])
#
# With no argument it runs all four; each stage has its own timeout so one slow stage cannot eat the call.
# Outputs (JSON) go to $OUT.
source "$(dirname "$0")/device_env.sh" gpu_check
stages=${*:-tests configs kernels decode}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for s in $stages; do
  echo "=== $s"
  case $s in
    tests)  # recent kernel changes: il4 split-K and L2 prefetch (every config on 7B down and qkv), the fused
      # attention, the embedding and argmax kernels of the step's head and tail, every M = 1024 GEMM config
      # (round 10 added three; round 11 kept one), RoPE in the qkv GEMV and the PDL modes (round 11)
      QRUN_KERNEL_TUNE=0 timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -m gpu tests/test_kernels_gpu.py \
        tests/test_gpu_model.py tests/test_gpu_pdl.py -k "${TESTS_K:-il4_layout_every_config and (18944 or \
        3584-4608) or fused_rope or quant_embedding or argmax_advance or prefill_gemm_every_config or rope_in_qkv \
        or pdl}" \
        --durations=8 -p no:cacheprovider --tb=short 2>&1 | tail -25 ;;
    configs)  # every GEMM config, the known-wrong tc16 ones included: rows over 5e-3 only
      timeout 150 python3 benchmarks/gemm_configs.py --repeats 2 --ms 64,1024 --every \
        --shapes "7B o,7B down,0.5B gate+up" > "$OUT/gemm_configs.txt" 2>&1
      awk '/M=/ {n++; if ($NF+0 > 5e-3 || $NF ~ /nan|inf/) print "BAD", $0} END {print n, "rows"}' \
        "$OUT/gemm_configs.txt"; tail -1 "$OUT/gemm_configs.txt" ;;
    kernels)
      timeout 220 python3 benchmarks/kernels.py --m 1,1024 --json "$OUT/kernels.json" 2>&1 | tail -26 ;;
    decode)
      timeout 420 python3 benchmarks/decode.py --configs qwen2.5-7b,qwen2-0.5b \
        --runs ${DECODE_RUNS:-graph,prefill1024,tc16,hf} \
        --out "$OUT" 2>&1 | tail -14 ;;
    tune)  # pick the GEMV configs by timing the whole decode step, then qrun bench with those picks
      for cfg in qwen2-0.5b qwen2.5-7b; do
        python3 -m qrun.cli.main convert --random $cfg -o /tmp/$cfg.stcmp -q
        timeout 200 python3 -m qrun.cli.main tune --model /tmp/$cfg.stcmp 2>&1 | tee "$OUT/tune-$cfg.txt"
        for i in $(seq ${BENCH_RUNS:-2}); do
          timeout 100 python3 -m qrun.cli.main bench --model /tmp/$cfg.stcmp --prompt-len 128 --gen-len 256 \
            --json | tee -a "$OUT/bench-$cfg.jsonl" | tail -1 | python3 -c "import json, sys
r = json.load(sys.stdin)
print('$cfg decode', round(r['decode_tok_s'], 1), 'prefill', round(r['prefill_tok_s']),
      'warm-up', round(r['warmup_s'], 1))"
        done
      done ;;
    ncu)  # why the L2 prefetch leaves 7B down where it is (PERF.md attempt 43): PF 0 against PF 1, same config
      for cfg in 1x2x0x1x4x0 1x2x0x1x4x1 1x4x0x2x1x0 1x4x0x2x1x1; do
        echo "--- 7B down, R4xGxDEEPxWARPSxSPLITxPF = $cfg"
        timeout 120 ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
          --metrics lts__t_sector_hit_rate.pct,dram__throughput.avg.pct_of_peak_sustained_elapsed \
          -k regex:gemv_il4 -s 3 -c 1 python3 benchmarks/profile_gemv.py --shape down --config $cfg 2>&1 \
          | grep -E -e "Duration|DRAM Throughput|Memory Throughput|L2 Hit|lts__t_sector_hit|dram__throughput" \
          -e "Stall|Issued Warp" \
          | head -24
      done ;;
    *) echo "gpu_check: unknown stage $s (tests, configs, kernels, decode, tune, ncu)" ;;
  esac
done
