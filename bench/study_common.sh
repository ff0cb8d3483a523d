# Sourced by the device-study scripts (bench/*_study.sh) from the repository root, once they have set STUDY (their
# name in log lines), START (date +%s), PY, OUT and CAP: makes OUT absolute, defines left (seconds of CAP left) and
# say (a timestamped log line), installs the wheels in WHEELS (default ./.whl when it exists; WHEELS= for none) with
# --no-index for machines without network, and records the GPU, the commit and the source sha256 in OUT (the
# machine's .git may name an older commit than the tree it runs; the digest names the tree).
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
left() { echo $((CAP - ($(date +%s) - START))); }
say() { echo "[$STUDY +$(($(date +%s) - START)) s] $*"; }

WHEELS=${WHEELS-$([ -d .whl ] && echo .whl)}
if [ -n "$WHEELS" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pgolf_site \
    "$WHEELS"/*.whl || { say "installing the wheels in $WHEELS failed"; exit 1; }
  export PYTHONPATH=/tmp/pgolf_site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
git log -1 --format='commit %H' 2>/dev/null | tee "$OUT/commit.txt"
echo "source sha256 $("$PY" bench/results_io.py --digest)" | tee -a "$OUT/commit.txt"
