#!/usr/bin/env bash
# Builds the interleaved A/B driver of the CPU decode kernel (decode_ab.cpp) from two source
# trees, e.g. a worktree of the last commit and the working tree:
#
#   git worktree add /tmp/base HEAD
#   scripts/decode_ab/build.sh /tmp/base/csrc csrc /tmp/decode_ab [avx512|avx2]
#   /tmp/decode_ab 16384 2 9 10      # SETS odd; several rounds: two runs of identical code have differed
#                                    # by up to 20% here
#
# The ISA level picks the kernel's flags (avx512, the default, or avx2 for the generic path).
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 CSRC_A CSRC_B OUT [avx512|avx2]"; exit 2; }
A=$(cd "$1" && pwd) B=$(cd "$2" && pwd) OUT=$3 ISA=${4:-avx512}
HERE=$(cd "$(dirname "$0")" && pwd)
case $ISA in
  avx512) ARCH="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mavx2 -mfma -mf16c -mbmi2" ;;
  avx2) ARCH="-mavx2 -mfma -mf16c -mbmi2" ;;
  *) echo "unknown ISA level $ISA"; exit 2 ;;
esac
FLAGS="-O3 -fno-math-errno -fopenmp -std=c++17 $ARCH"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
pids=()
for v in va:"$A" vb:"$B"; do
  ns=${v%%:*} src=${v#*:}
  printf '#include "core/decode_params.h"\nnamespace gk::cpu::%s { template <class T> void decode_attention(const gk::DecodeParams&, int); }\n#define GK_CPU_ISA_NS %s\n#include "cpu/kernels/decode_attention.cpp"\n' "$ns" "$ns" > "$TMP/$ns.cpp"
  g++ $FLAGS -I"$src" -c "$TMP/$ns.cpp" -o "$TMP/$ns.o" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
g++ $FLAGS -I"$B" "$HERE/decode_ab.cpp" "$TMP/va.o" "$TMP/vb.o" -o "$OUT"
