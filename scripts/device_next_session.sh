#!/usr/bin/env bash
# GPU device, one call (< 600 s): re-measure the defaults (docs/BENCHMARKS.md, runs 31-35).
# Run from the repository root on the device:
#   bash scripts/device_next_session.sh        (outputs under $OUT, else out/device)
# 1. the defaults with plain VGGT in the same bench process (ratio, 1.10 in runs 31-34) and the
#    500-frame streams: pipelined and serial engine with every frame queued, pipelined behind a
#    30 Hz camera. Window sizes must be {16, 12 (the flush)}, no window may take seconds (a
#    compile), "predicted ahead" 60 with none discarded;
# 2. one pipelined stream alone in its process (the node's case; runs 35-36: 29.8-31.0 frames/s, window
#    mean 262 ms, p90 276, memory plateau 6.558 GB);
# 3. graph_check (the CUDA-graph path: labels equal to eager and scikit-learn).
# Each step has its own timeout and log file (never piped: a pipe's buffer is lost when the
# call times out). The device's git copy may be stale: name the tree yourself in BENCHMARKS.md.
source "$(dirname "$0")/device_prelude.sh"      # sets $out, PYTHONPATH, gpu.txt

timeout 300 python -m vggt4d_ros.tools.bench --frames 16 --repeats 7 --skip ablation attention \
    --out "$out/bench.json" > "$out/bench.log" 2>&1
echo "bench rc=$?"
timeout 150 python -m vggt4d_ros.tools.bench --frames 16 --skip plain vggt4d ablation attention \
    --stream-runs pipelined --out "$out/stream_alone.json" > "$out/stream_alone.log" 2>&1
echo "stream alone rc=$?"
timeout 110 python -m vggt4d_ros.tools.graph_check --repeats 5 \
    --out "$out/graph_check.json" > "$out/graph_check.log" 2>&1
echo "graph_check rc=$? (0 = labels equal)"
grep -hE "^plain|^vggt4d|^stream" "$out/bench.log" "$out/stream_alone.log" \
    | sed -e 's/CUDA-graph caches.*window sizes/window sizes/' | cut -c1-1000
tail -n 2 "$out/graph_check.log" | cut -c1-600
