"""End-to-end tests of train/train_gpt.py on CPU with a tiny model, tiny tokenizer and tiny shards.

The trainer runs as a subprocess configured by environment variables (as a user would run it); the tests parse
its log lines. A session fixture builds the data once: a SentencePiece model trained with the challenge's
settings on synthetic text, and train/val shards written with pgolf_kernels.shards.
"""
from __future__ import annotations

import importlib.util
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "train" / "train_gpt.py"
VOCAB = 384
SEQ = 32


def _synthetic_docs(n_docs: int, seed: int) -> list[str]:
    """Sentences of made-up words from a sparse bigram chain: learnable, so a tiny model's loss falls."""
    chain = random.Random(1234)  # the words and their successors are the same for train and val
    words = ["".join(chain.choice("abcdefghijklmnop") for _ in range(chain.randint(2, 6))) for _ in range(60)]
    succ = {w: chain.sample(words, 4) for w in words}
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        w = rng.choice(words)
        out = [w]
        for _ in range(rng.randint(20, 80)):
            w = rng.choice(succ[w]) if rng.random() < 0.9 else rng.choice(words)
            out.append(w)
        docs.append(" ".join(out).capitalize() + ".")
    return docs


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    import sentencepiece as spm
    from pgolf_kernels.shards import write_shard

    root = tmp_path_factory.mktemp("pgolf_data")
    (root / "tokenizers").mkdir()
    ds = root / "datasets" / f"fineweb10B_sp{VOCAB}"
    ds.mkdir(parents=True)
    train_docs, val_docs = _synthetic_docs(600, seed=1), _synthetic_docs(60, seed=2)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train_docs), model_prefix=str(root / "tokenizers" / f"fineweb_{VOCAB}_bpe"),
        model_type="bpe", vocab_size=VOCAB, character_coverage=0.999, byte_fallback=True, split_digits=True,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        hard_vocab_limit=False, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"))
    assert sp.vocab_size() == VOCAB

    def encode(docs):
        return [t for d in docs for t in [1] + sp.encode(d)]

    train = encode(train_docs)
    half = len(train) // 2  # two train shards, so the stream crosses a shard boundary
    write_shard(ds / "fineweb_train_000000.bin", train[:half])
    write_shard(ds / "fineweb_train_000001.bin", train[half:])
    write_shard(ds / "fineweb_val_000000.bin", encode(val_docs)[: 64 * SEQ + 1])
    return root


def tiny_env(data_root: Path, out_dir: Path, **overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(
        DATA_PATH=str(data_root / "datasets" / f"fineweb10B_sp{VOCAB}"),
        TOKENIZER_PATH=str(data_root / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"),
        RUN_ID="t", SEED="1337", VOCAB_SIZE=str(VOCAB), NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4",
        NUM_KV_HEADS="2", TRAIN_SEQ_LEN=str(SEQ), TRAIN_BATCH_TOKENS=str(8 * 2 * SEQ), VAL_BATCH_SIZE=str(8 * 16 * SEQ),
        ITERATIONS="30", WARMUP_STEPS="2", WARMDOWN_ITERS="10", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1",
        MAX_WALLCLOCK_SECONDS="0", EVAL_STRIDE="16", DEVICE="cpu", KERNELS="eager", DTYPE="fp32",
        OUT_DIR=str(out_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_trainer(env: dict, nproc: int = 1, timeout: int = 180) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT)]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def train_losses(text: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step:(\d+)/\d+ train_loss:(\S+) .* tok/s:\d+$", text, re.M)}


def exact_line(text: str, name: str) -> tuple[float, float]:
    m = re.search(rf"^{name} (?:stride:\d+ )?val_loss:(\S+) val_bpb:(\S+)", text, re.M)
    assert m, f"no {name} line in:\n{text[-3000:]}"
    return float(m[1]), float(m[2])


def load_trainer_module():
    spec = importlib.util.spec_from_file_location("pgolf_train_gpt", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
