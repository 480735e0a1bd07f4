#!/usr/bin/env bash
# GPU device, one call (< 600 s): is the CUDA-graph k-means (Vggt4dConfig.cuda_graphs, off by
# default) label-identical and faster? Run from the repository root on the device:
#   bash scripts/device_cuda_graph_check.sh        (outputs under $OUT, else out/device)
# Then, in a second call: python -m vggt4d_ros.tools.bench --frames 16 --skip ablation stream
# Each step has its own timeout and writes its log to a file (never piped: a pipe's buffer is
# lost when the call times out).
source "$(dirname "$0")/device_prelude.sh"      # sets $out, PYTHONPATH, gpu.txt

timeout 110 python -m vggt4d_ros.tools.graph_check --repeats 5 \
    --out "$out/graph_check.json" > "$out/graph_check.log" 2>&1
echo "graph_check rc=$? (0 = labels equal)"

for name in eager graphs graphs_overlap; do
    case $name in
        eager) sets="cuda_graphs=False" ;;
        graphs) sets="cuda_graphs=True" ;;
        graphs_overlap) sets="cuda_graphs=True overlap_stages=True" ;;
    esac
    # shellcheck disable=SC2086
    timeout 155 python -m vggt4d_ros.tools.profile_window --frames 16 --skip-overlap --repeats 3 \
        --set $sets --out "$out/profile_$name.json" > "$out/profile_$name.log" 2>&1
    echo "profile $name rc=$?"
done
tail -n 3 "$out"/graph_check.log "$out"/profile_*.log
