#!/usr/bin/env bash
# The GPU calls behind benchmarks/KERNELS.md (run from the repository root on the device machine;
# results land in $OUT). Each call is self-contained: compiles in parallel, checks, times.
set -euo pipefail
OUT=${OUT:-./kernel-results}
case "${1:-final}" in
  sweep)  # retune the whole table (decode kinds/tiles, GEMM tiles), then benchmark with it
    python3 benchmarks/bench_kernels.py --out "$OUT" --sections info,overhead,check,sweep,bench,graph --quick-check \
      --sweep-shapes qkv,o,gate_up,down,70b_gate_up_shard --sweep-m 1,16,1024 --tag _sweep ;;
  final)  # full check, host overhead, benchmark with the committed table, pipeline ablation
    python3 benchmarks/bench_kernels.py --out "$OUT" --sections info,check,overhead,bench,graph,ablation --tag _final ;;
  ncu)    # profile one decode launch
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
    "$NCU" --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \
      --section LaunchStats --section MemoryWorkloadAnalysis -k regex:dashq -c 1 \
      python3 benchmarks/bench_kernels.py --single "${2:-gate_up,4,128,1}" > "$OUT/ncu.txt" 2>&1 ;;
esac
# Plot (CPU is fine): python3 benchmarks/bench_kernels.py --plot $OUT/kernels_final.json benchmarks/results/kernels_speedup.png
