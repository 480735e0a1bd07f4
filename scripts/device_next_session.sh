#!/usr/bin/env bash
# GPU device, one call (< 600 s): re-measure the defaults (docs/BENCHMARKS.md, runs 21-27).
# Run from the repository root on the device:
#   bash scripts/device_next_session.sh        (outputs under $OUT, else out/device)
# 1. the defaults (CUDA graphs captured at high priority, interleaved side stages) with plain
#    VGGT in the same bench process (ratio), and a 500-frame stream: its window sizes must be
#    {16, 12 (the flush)} and no window may take seconds (a compile);
#    Check of the last commit of session 15 (not measured yet): "VGGT4D stages in the stream"
#    must show pass2 close to the isolated window's pass2 (run 30: 156.4 vs 102.3 ms, cuDNN
#    building a plan per gathered-key count; now FlashAttention-2 for those layers);
# 2. graph_check (the CUDA-graph path: labels equal to eager and scikit-learn).
# Each step has its own timeout and log file (never piped: a pipe's buffer is lost when the
# call times out).
source "$(dirname "$0")/device_prelude.sh"      # sets $out, PYTHONPATH, gpu.txt

timeout 420 python -m vggt4d_ros.tools.bench --frames 16 --repeats 7 --skip ablation attention \
    --out "$out/bench.json" > "$out/bench.log" 2>&1
echo "bench rc=$?"
timeout 110 python -m vggt4d_ros.tools.graph_check --repeats 5 \
    --out "$out/graph_check.json" > "$out/graph_check.log" 2>&1
echo "graph_check rc=$? (0 = labels equal)"
grep -E "^plain|^vggt4d|^stream" "$out/bench.log" | cut -c1-900
tail -n 2 "$out/graph_check.log" | cut -c1-600
