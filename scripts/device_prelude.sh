# Sourced by the scripts/device_*.sh calls (repository root on the GPU device): output folder
# "$out" ($OUT, else out/device), the package importable, and gpu.txt (card, driver, date,
# commit) beside the results.
set -u
out=${OUT:-out/device}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
date -u +%FT%TZ >> "$out/gpu.txt"
git rev-parse HEAD >> "$out/gpu.txt" 2>/dev/null
