#!/usr/bin/env bash
# pgolf's main job (README, set-up command 1): install, prepare the default corpus, train, export,
# print val_bpb and the artifact's bytes.
#
#   CUDA present: the whole default corpus (Debian documentation, ~250 M tokens at sp1024) and the official
#                 baseline config on every visible GPU (torchrun), 10-minute wall-clock cap, int8+zlib export.
#   CPU only:     a slice of the same corpus and a tiny config, so the whole command ends in about 10 minutes
#                 on 2 cores. The numbers it prints are real, for that tiny model.
#
# Environment variables pass through to the trainer (the official names: ITERATIONS, NUM_LAYERS, ...), so
# `ITERATIONS=500 bash scripts/main.sh` works. PGOLF_DATA (default ./data) is where corpus and shards go.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA=${PGOLF_DATA:-./data}
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== install"
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q setuptools wheel
if "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then
  # CUTLASS's headers (the wheel carries them; its Python deps are not needed to build): setup.py then compiles the
  # fused block's CUTLASS GEMMs (csrc/block_gemm_sm90.cu, csrc/block_attn_dx_sm90.cu) into the extension
  "$PY" -m pip install -q --no-deps "nvidia-cutlass==4.2.0.0"
fi
"$PY" -m pip install -q --no-build-isolation -e ".[prepare]"

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  echo "== prepare: default corpus (debian-docs, full)"
  "$PY" -m pgolf_kernels.prepare debian-docs --out "$DATA"
  echo "== train + export: baseline config on $NGPU GPU(s)"
  export DATA_PATH="$DATA/datasets/fineweb10B_sp1024" TOKENIZER_PATH="$DATA/tokenizers/fineweb_1024_bpe.model"
  export OUT_DIR=${OUT_DIR:-./runs/main}
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" train/train_gpt.py
else
  SLICE="$DATA/cpu-slice"
  echo "== prepare: CPU slice of the default corpus (debian-docs, ${PGOLF_CPU_BYTES:=12000000} bytes of text)"
  "$PY" -m pgolf_kernels.prepare debian-docs --out "$SLICE" --max-bytes "$PGOLF_CPU_BYTES" --val-tokens 65536
  echo "== train + export: tiny config on the CPU"
  export DATA_PATH="$SLICE/datasets/fineweb10B_sp1024" TOKENIZER_PATH="$SLICE/tokenizers/fineweb_1024_bpe.model"
  export OUT_DIR=${OUT_DIR:-./runs/main-cpu}
  # Tiny model: 4 layers of width 128; 8 micro-steps of 4 sequences of 256 tokens per step.
  export NUM_LAYERS=${NUM_LAYERS:-4} MODEL_DIM=${MODEL_DIM:-128} NUM_HEADS=${NUM_HEADS:-4} NUM_KV_HEADS=${NUM_KV_HEADS:-2}
  export TRAIN_SEQ_LEN=${TRAIN_SEQ_LEN:-256} TRAIN_BATCH_TOKENS=${TRAIN_BATCH_TOKENS:-8192}
  export ITERATIONS=${ITERATIONS:-300} WARMDOWN_ITERS=${WARMDOWN_ITERS:-100} WARMUP_STEPS=${WARMUP_STEPS:-2}
  export VAL_BATCH_SIZE=${VAL_BATCH_SIZE:-16384} VAL_LOSS_EVERY=${VAL_LOSS_EVERY:-100} TRAIN_LOG_EVERY=${TRAIN_LOG_EVERY:-25}
  export MAX_WALLCLOCK_SECONDS=${MAX_WALLCLOCK_SECONDS:-300} EVAL_STRIDE=${EVAL_STRIDE:-128}
  "$PY" train/train_gpt.py
fi
