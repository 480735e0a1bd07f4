#!/usr/bin/env bash
# GPU device, one call (< 600 s): re-measure the defaults (docs/BENCHMARKS.md, runs 43-48).
# Run from the repository root on the device:
#   bash scripts/device_next_session.sh        (outputs under $OUT, else out/device)
# 1. the defaults with plain VGGT in the same bench process (ratio 0.97 in run 47; the
#    official numerics and the defaults of run 42 are timed interleaved as variants) and two
#    500-frame streams: pipelined with every frame queued (33.7 frames/s in run 46) and behind
#    a live 30 Hz camera. Window sizes must be {16, 12 (the flush)}, no window may take seconds
#    (a compile), "predicted ahead" 60 with none discarded, no capture-failure warning;
# 2. one pipelined stream alone in its process (the node's case: 34.4 frames/s, p90 264 ms,
#    memory flat at 9.32 GB in run 47);
# 3. numerics_check: the fast path against the fp32 reference path (PASS in runs 39-47).
# Each step has its own timeout and log file (never piped: a pipe's buffer is lost when the
# call times out). The device's git copy may be stale: name the tree yourself in BENCHMARKS.md.
source "$(dirname "$0")/device_prelude.sh"      # sets $out, PYTHONPATH, gpu.txt
export PYTHONUNBUFFERED=1

timeout 300 python -m vggt4d_ros.tools.bench --frames 16 --repeats 7 --skip ablation attention \
    --variants official_numerics none_of_the_four --stream-runs pipelined live30 --out "$out/bench.json" > "$out/bench.log" 2>&1
echo "bench rc=$?"
timeout 120 python -m vggt4d_ros.tools.bench --frames 16 --skip plain vggt4d ablation attention \
    --stream-runs pipelined --out "$out/stream_alone.json" > "$out/stream_alone.log" 2>&1
echo "stream alone rc=$?"
timeout 140 python -m vggt4d_ros.tools.numerics_check --frames 16 --json "$out/numerics.json" \
    > "$out/numerics.log" 2>&1
echo "numerics_check rc=$? (0 = within the bf16 tolerance)"
grep -hE "^plain|^vggt4d|^stream" "$out/bench.log" "$out/stream_alone.log" \
    | sed -e 's/CUDA-graph caches.*window sizes/window sizes/' | cut -c1-1000
grep -hiE "capture failed" "$out/bench.log" "$out/stream_alone.log" | head -3
tail -n 4 "$out/numerics.log" | cut -c1-300
