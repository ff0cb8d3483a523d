#!/usr/bin/env bash
# One H100/H200 A/B of a probe build of the fused CE (csrc/flce_kernels.cu + csrc/flce_sm90.cu built alone by
# bench/probe_flce_sm90.py), unattended:
#   1. builds the default and the $FLAG build side by side (each its own torch extension name);
#   2. runs the fused CE tests of the C++ host path (the cuBLAS loop, which runs the CE row kernel at V <= 2048) with
#      the $FLAG build standing in for the extension -> $OUT/pytest-flag.txt;
#   3. times the forward+backward step (CUDA-graph replay) and its kernels at $CASES with TUNING gemm=cublas, the
#      default and the $FLAG build alternating ROUNDS times, each in a process of its own -> $OUT/ab.txt.
# The ratio is read from the rows of that one file (same machine, same call).
#
#   OUT=/tmp/ce bash bench/fused_ce_study.sh           # FLAG=-DPGOLF_FLCE_CE_CACHED_EXP (one MUFU op fewer per logit)
#
# Environment: OUT (default ./runs/fused_ce_study); FLAG; CASES (N65536_d512_V1024,N262144_d512_V1024); ROUNDS (2);
# WHEELS, a folder of wheels to install first with --no-index (the nvidia-cutlass wheel gives CUTLASS's headers;
# default ./.whl when it exists, WHEELS= for none); CAP (seconds, 560), BUILD_S (240), TEST_S (150), MAX_JOBS (8 for
# each build). Commit what matters as bench/results/fused_ce_sm90-<gpu>-<date>-<commit>-<tag>.txt with a first line
# naming the command and commit (../shared/docs/bench-results.md); commit.txt has the source sha256 to match the tree.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
PY=${PYTHON:-python3}
OUT=${OUT:-./runs/fused_ce_study}
FLAG=${FLAG:--DPGOLF_FLCE_CE_CACHED_EXP}
# The default arm passes a flag the probe's build has anyway, so that it too is built alone, with the same options,
# even where the whole extension is installed (probe_flce_sm90.py takes that one when no flag is given).
BASE=-DNDEBUG
CASES=${CASES:-N65536_d512_V1024,N262144_d512_V1024}
ROUNDS=${ROUNDS:-2}
CAP=${CAP:-560}
BUILD_S=${BUILD_S:-240}
TEST_S=${TEST_S:-150}
export MAX_JOBS=${MAX_JOBS:-8}
STUDY=fused_ce_study
. bench/study_common.sh

say "building the default and the '$FLAG' builds (MAX_JOBS=$MAX_JOBS each, limit $BUILD_S s)"
timeout "$BUILD_S" "$PY" bench/probe_flce_sm90.py --nvcc-flags="$BASE" --build-only > "$OUT/build-default.txt" 2>&1 &
A=$!
timeout "$BUILD_S" "$PY" bench/probe_flce_sm90.py --nvcc-flags="$FLAG" --build-only > "$OUT/build-flag.txt" 2>&1 &
B=$!
wait "$A"; ra=$?
wait "$B"; rb=$?
say "builds: default rc=$ra, flag rc=$rb"
[ "$ra" -eq 0 ] && [ "$rb" -eq 0 ] || { tail -n 30 "$OUT/build-default.txt" "$OUT/build-flag.txt"; exit 1; }

T=$(($(left) < TEST_S ? $(left) : TEST_S))
say "fused CE tests of the C++ host path with the '$FLAG' build (limit $T s)"
timeout "$T" "$PY" bench/probe_flce_sm90.py --nvcc-flags="$FLAG" --no-check --pytest cpp_host \
  > "$OUT/pytest-flag.txt" 2>&1
say "pytest (flag) rc=$? ($(grep -E 'passed|failed' "$OUT/pytest-flag.txt" | tail -1))"

: > "$OUT/ab.txt"
for r in $(seq 1 "$ROUNDS"); do
  for f in "$BASE" "$FLAG"; do
    T=$(left)
    [ "$T" -gt 20 ] || { say "no time left for round $r"; break 2; }
    say "round $r: flags '$f' (limit $T s)"
    timeout "$T" "$PY" bench/probe_flce_sm90.py --nvcc-flags="$f" --no-check --tuning gemm=cublas --kernels "$CASES" \
      >> "$OUT/ab.txt" 2>&1
    say "rc=$?"
  done
done
grep -E "graph ms" "$OUT/ab.txt"
say done
