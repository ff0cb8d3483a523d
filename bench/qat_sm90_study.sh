#!/usr/bin/env bash
# One H100/H200 study of the sm_90a QAT matmuls (csrc/qat_linear_sm90.cu), end to end and unattended:
#   1. builds the whole extension (setup.py; CUTLASS from the nvidia-cutlass wheel) in the background,
#      with PGOLF_NVCC_FLAGS=$FLAGS when FLAGS is set (a kernel form under test as the extension's default);
#   2. checks the schedules under test (NEW_SCHEDULES, default 8,9) alone, in a process of their own, and
#      leaves them out of the later steps if that fails or hangs -> $OUT/probe-new.txt;
#   3. unless VARIANTS is empty: bench/probe_qat_sm90.py --variants="$VARIANTS" --schedules=$SCHEDULES (each flag set
#      built alone, checked bit for bit against the per-tile kernel and float64 unless it is a _PROBE_ build, and
#      timed beside cuBLAS, each in its own process) -> $OUT/probe.txt;
#   4. bench/bench_int6_linear.py --impls $IMPLS (forward+backward against the plain bf16 linear) -> $OUT/int6_linear-*;
#   5. the int6_linear GPU tests -> $OUT/pytest.txt, cut off at CAP seconds after the script started.
# Each step has its own time limit, so a slow step still leaves the others' files in $OUT; at the end the logs are
# packed into $OUT/logs.tgz (the device tool returns at most 8 files). (setup.py finds CUTLASS's headers in the
# nvidia-cutlass wheel, or under $CUTLASS_HOME.)
#
#   OUT=/tmp/study bash bench/qat_sm90_study.sh                    # the default variants, schedules and impls
#   FLAGS="-DQAT_SA_QW=2" VARIANTS= bash bench/qat_sm90_study.sh  # the extension built with a form: bench and tests
#
# Environment: OUT (default ./runs/qat_sm90_study); WHEELS, a folder of wheels to install first with --no-index on
# machines without network (zstandard, brotli, nvidia-cutlass; default ./.whl when it exists, WHEELS= for none); CAP
# (seconds, 560), MAX_JOBS (10), SMOKE_S (120), PROBE_S (300; VARIANT_S, 80, for each variant), BENCH_S (150). The
# files are raw logs; commit the ones that matter as bench/results/qat_sm90_schedules-<gpu>-<date>-<commit>-<tag>.txt
# and int6_linear-<gpu>-<date>-<commit>.* with a first line naming the command and commit
# (../shared/docs/bench-results.md); commit.txt has the source sha256 to match the tree (the machine's .git may name
# an older commit).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
PY=${PYTHON:-python3}
OUT=${OUT:-./runs/qat_sm90_study}
CAP=${CAP:-560}
PROBE_S=${PROBE_S:-300}
VARIANT_S=${VARIANT_S:-80}
SMOKE_S=${SMOKE_S:-120}
BENCH_S=${BENCH_S:-150}
export MAX_JOBS=${MAX_JOBS:-10}
# most telling first: the default build (its check confirms every schedule timed, 8 and 9 included), where the
# cycles go, the two-warp quantiser form, the slab's cycles, 64-wide stages. (The _PROBE_NO_* builds, which time
# parts alone, are left for a call of their own: PROBE_S would not hold them beside the bench and the tests.)
DEFAULT_VARIANTS="-DNDEBUG;-DQAT_SA_PROBE_CLOCKS;-DQAT_SA_QW=2;-DQAT_SLAB_PROBE_CLOCKS;-DQAT_SA_R=64;"
DEFAULT_VARIANTS+="-DQAT_SA_PROBE_CLOCKS -DQAT_SA_QW=2"
VARIANTS=${VARIANTS-$DEFAULT_VARIANTS}
SCHEDULES=${SCHEDULES:-1,4,6,7,8,9}
IMPLS=${IMPLS:-plain,fused_prologue,fused_prologue_auto_qw,fused_quant_cublas}
NEW_SCHEDULES=${NEW_SCHEDULES-8,9}  # changed since their last GPU run: checked alone first (empty: skip that)
PYTEST_K=${PYTEST_K:-}  # a pytest -k expression for the GPU tests (set below if the new schedules fail)
STUDY=qat_sm90_study
. bench/study_common.sh

say "building the extension (MAX_JOBS=$MAX_JOBS, PGOLF_NVCC_FLAGS='${FLAGS:-}')"
(PGOLF_NVCC_FLAGS="${FLAGS:-}" PGOLF_REQUIRE_CUDA_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
  > "$OUT/build.txt" 2>&1; echo "rc=$?" >> "$OUT/build.txt") &
BUILD=$!

# The kernels under test come first, alone (schedules 8 and 9, the quantiser-warp form, checked in a process
# of their own): if they fail or hang, the later steps leave them out instead of losing their own results to them.
if [ -n "$NEW_SCHEDULES" ]; then
  say "probe: new schedules $NEW_SCHEDULES, check only (limit $SMOKE_S s)"
  timeout "$SMOKE_S" "$PY" bench/probe_qat_sm90.py --nvcc-flags=-DNDEBUG --schedules="$NEW_SCHEDULES" --check-only \
    > "$OUT/probe-new.txt" 2>&1
  rc=$?
  say "probe (new schedules) rc=$rc"
  if [ "$rc" -ne 0 ]; then
    for s in ${NEW_SCHEDULES//,/ }; do SCHEDULES=$(echo ",$SCHEDULES," | sed "s/,$s,/,/; s/^,//; s/,$//"); done
    IMPLS=$(echo "$IMPLS" | tr ',' '\n' | grep -v '_qw' | paste -sd, -)
    PYTEST_K="not matches_triton_prologue_and_reference"
    say "left out from here on: schedules $NEW_SCHEDULES (now $SCHEDULES), impls *_qw (now $IMPLS), and the test" \
      "that runs every backend"
  fi
fi
if [ -n "$VARIANTS" ]; then
  say "probe: variants '$VARIANTS', schedules $SCHEDULES"
  timeout "$PROBE_S" "$PY" bench/probe_qat_sm90.py --variants="$VARIANTS" --schedules="$SCHEDULES" \
    --variant-timeout="$VARIANT_S" > "$OUT/probe.txt" 2>&1
  say "probe rc=$?"
fi
wait "$BUILD"
say "extension build: $(tail -1 "$OUT/build.txt")"
grep -q "rc=0" "$OUT/build.txt" || { tail -n 30 "$OUT/build.txt"; exit 1; }

B=$(($(left) < BENCH_S ? $(left) : BENCH_S))
if [ "$B" -gt 30 ]; then
  say "bench_int6_linear --impls $IMPLS (limit $B s)"
  timeout "$B" "$PY" bench/bench_int6_linear.py --out "$OUT" --no-export --no-compile --impls "$IMPLS" \
    > "$OUT/bench.txt" 2>&1
  say "bench rc=$?"
else
  say "no time left for the bench"
fi
T=$(left)
if [ "$T" -gt 20 ]; then
  say "int6_linear GPU tests (limit $T s)"
  timeout "$T" "$PY" -m pytest -q -ra -m gpu ${PYTEST_K:+-k "$PYTEST_K"} tests/test_int6_linear.py \
    > "$OUT/pytest.txt" 2>&1
  say "pytest rc=$?"
else
  say "no time left for the tests"
fi
tail -n 5 "$OUT/probe-new.txt" "$OUT/probe.txt" "$OUT/bench.txt" "$OUT/pytest.txt" 2>/dev/null
# The device tool brings back at most 8 files from $OUT: the logs go back as one archive beside the bench's files.
# (The archive is written outside $OUT first: tar fails on a folder that changes while it reads it.)
tar czf /tmp/qat_sm90_study_logs.tgz -C "$OUT" --exclude='int6_linear-*' . && mv /tmp/qat_sm90_study_logs.tgz "$OUT/logs.tgz" \
  && find "$OUT" -maxdepth 1 -type f -name '*.txt' -delete
say "done: $(ls "$OUT" | tr '\n' ' ')"
