"""Shard format, validation refusals and the official token order of the loaders."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf_kernels.shards import (
    FILE_MODE,
    HEADER_BYTES,
    SHARD_MAGIC,
    DistributedTokenLoader,
    ShardError,
    TokenStream,
    check_tokenizer,
    list_shards,
    load_validation_tokens,
    read_shard,
    shard_token_count,
    write_shard,
)


def _random_tokens(n: int, vocab: int = 1024, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=n, dtype=np.int64)


def test_round_trip_bytes_and_values(tmp_path):
    tokens = _random_tokens(5000)
    path = write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    assert path.stat().st_size == HEADER_BYTES + 2 * tokens.size
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[0] == SHARD_MAGIC and header[1] == 1 and header[2] == tokens.size
    assert not header[3:].any()
    got = read_shard(path, vocab_size=1024)
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, tokens)
    assert shard_token_count(path) == tokens.size
    assert path.stat().st_mode & 0o777 == FILE_MODE  # not mkstemp's 0600
    # no temp files left behind by the atomic write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fineweb_train_000000.bin"]


def test_write_refuses_ids_beyond_uint16(tmp_path):
    with pytest.raises(ShardError, match=r"token id 65536 does not fit uint16"):
        write_shard(tmp_path / "a.bin", [1, 2, 65536])
    with pytest.raises(ShardError, match=r"negative"):
        write_shard(tmp_path / "a.bin", [1, -1])
    assert not (tmp_path / "a.bin").exists()


def test_refuses_empty_file(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    path.write_bytes(b"")
    with pytest.raises(ShardError, match=r"fineweb_val_000000\.bin: file is empty"):
        read_shard(path)


def test_refuses_file_shorter_than_header(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ShardError, match=r"fineweb_val_000000\.bin: file has 100 bytes, shorter than the 1024-byte"):
        read_shard(path)


def test_refuses_wrong_magic_and_version(tmp_path):
    path = write_shard(tmp_path / "s.bin", _random_tokens(10))
    raw = bytearray(path.read_bytes())
    bad = bytearray(raw)
    bad[0:4] = np.int32(12345).tobytes()
    (tmp_path / "magic.bin").write_bytes(bad)
    with pytest.raises(ShardError, match=r"magic\.bin: wrong magic 12345 \(expected 20240520\)"):
        read_shard(tmp_path / "magic.bin")
    bad = bytearray(raw)
    bad[4:8] = np.int32(2).tobytes()
    (tmp_path / "version.bin").write_bytes(bad)
    with pytest.raises(ShardError, match=r"version\.bin: unsupported shard version 2"):
        read_shard(tmp_path / "version.bin")


def test_refuses_size_mismatch_truncated_and_padded(tmp_path):
    path = write_shard(tmp_path / "fineweb_val_000000.bin", _random_tokens(1000))
    raw = path.read_bytes()
    path.write_bytes(raw[:1500])
    with pytest.raises(
        ShardError,
        match=r"fineweb_val_000000\.bin: header says 1000 tokens \(3024 bytes\) but file has 1500 bytes — truncated or corrupt",
    ):
        read_shard(path)
    path.write_bytes(raw + b"\x00\x00")
    with pytest.raises(ShardError, match=r"header says 1000 tokens \(3024 bytes\) but file has 3026 bytes"):
        read_shard(path)


def test_refuses_token_ids_outside_vocab(tmp_path):
    tokens = _random_tokens(3000, vocab=1000)
    tokens[2345] = 1500
    path = write_shard(tmp_path / "fineweb_train_000003.bin", tokens)
    read_shard(path)  # fine without a vocabulary
    read_shard(path, vocab_size=2000)
    with pytest.raises(ShardError, match=r"fineweb_train_000003\.bin: token id 1500 at position 2345 is outside the vocabulary \(VOCAB_SIZE=1024\)"):
        read_shard(path, vocab_size=1024)


def test_list_shards_sorted_and_no_match(tmp_path):
    for i in (2, 0, 1):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", [1, 2, 3])
    names = [p.name for p in list_shards(str(tmp_path / "fineweb_train_*.bin"))]
    assert names == [f"fineweb_train_{i:06d}.bin" for i in range(3)]
    with pytest.raises(ShardError, match=r"no files match .*fineweb_val_\*\.bin"):
        list_shards(str(tmp_path / "fineweb_val_*.bin"))
    with pytest.raises(ShardError, match=r"no files match .*\(directory .* does not exist\)"):
        TokenStream(str(tmp_path / "nowhere" / "*.bin"))


def _train_tokenizer(tmp_path, vocab_size: int) -> str:
    import sentencepiece as spm

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma"]
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=12)) for _ in range(300)]
    prefix = tmp_path / "tok"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, hard_vocab_limit=False, minloglevel=2,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3,
    )
    return str(prefix) + ".model"


def test_check_tokenizer_mismatch_and_missing(tmp_path):
    model = _train_tokenizer(tmp_path, 300)
    assert check_tokenizer(model, 300).vocab_size() == 300
    with pytest.raises(ValueError, match=r"tok\.model has 300 pieces, VOCAB_SIZE says 1024"):
        check_tokenizer(model, 1024)
    with pytest.raises(ValueError, match=r"does not exist"):
        check_tokenizer(tmp_path / "missing.model", 300)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"not a loadable SentencePiece model"):
        check_tokenizer(tmp_path / "junk.model", 300)


def test_load_validation_tokens_trims_like_official(tmp_path):
    a, b = _random_tokens(700, seed=1), _random_tokens(650, seed=2)
    write_shard(tmp_path / "fineweb_val_000000.bin", a)
    write_shard(tmp_path / "fineweb_val_000001.bin", b)
    got = load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), seq_len=128, vocab_size=1024)
    both = np.concatenate([a, b])
    usable = ((both.size - 1) // 128) * 128
    assert got.dtype == torch.int64 and got.numel() == usable + 1 == 1281
    np.testing.assert_array_equal(got.numpy(), both[: usable + 1])
    with pytest.raises(ShardError, match=r"hold 1350 tokens; at least seq_len\+1 = 2049"):
        load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), seq_len=2048)


def _official_batches(shards: list[np.ndarray], rank, world, global_tokens, seq_len, accum, steps):
    """The official loader's semantics written out plainly: a cyclic stream, per-rank contiguous spans."""
    stream = np.concatenate(shards)
    pos = 0
    out = []
    local = global_tokens // (world * accum)
    span = local + 1
    for _ in range(steps):
        need = span * world
        idx = (pos + np.arange(need)) % stream.size
        pos = (pos + need) % stream.size
        chunk = stream[idx]
        mine = chunk[rank * span : (rank + 1) * span].astype(np.int64)
        out.append((mine[:-1].reshape(-1, seq_len), mine[1:].reshape(-1, seq_len)))
    return out


def test_distributed_loader_matches_official_order_and_wraps(tmp_path):
    shards = [_random_tokens(n, seed=10 + i) for i, n in enumerate((1000, 333, 1500))]
    for i, s in enumerate(shards):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", s)
    pattern = str(tmp_path / "fineweb_train_*.bin")
    global_tokens, seq_len, accum, steps = 512, 64, 2, 12  # 12 steps * ~1030 tokens wraps the 2833 tokens
    one = DistributedTokenLoader(pattern, 0, 1, "cpu", vocab_size=1024)
    two = [DistributedTokenLoader(pattern, r, 2, "cpu", vocab_size=1024) for r in range(2)]
    ref1 = _official_batches(shards, 0, 1, global_tokens, seq_len, accum, steps)
    ref2 = [_official_batches(shards, r, 2, global_tokens, seq_len, accum, steps) for r in range(2)]
    for step in range(steps):
        x1, y1 = one.next_batch(global_tokens, seq_len, accum)
        assert x1.dtype == torch.int64 and x1.shape == (4, seq_len)
        np.testing.assert_array_equal(x1.numpy(), ref1[step][0])
        np.testing.assert_array_equal(y1.numpy(), ref1[step][1])
        for r in range(2):
            x, y = two[r].next_batch(global_tokens, seq_len, accum)
            assert x.shape == (2, seq_len)
            np.testing.assert_array_equal(x.numpy(), ref2[r][step][0])
            np.testing.assert_array_equal(y.numpy(), ref2[r][step][1])
            assert torch.equal(x[:, 1:], y[:, :-1])
    # determinism: a fresh loader replays the same stream
    again = DistributedTokenLoader(pattern, 1, 2, "cpu")
    np.testing.assert_array_equal(again.next_batch(global_tokens, seq_len, accum)[0].numpy(), ref2[1][0][0])


def test_two_ranks_cover_the_one_rank_stream(tmp_path):
    """With world=2 and accum=1, rank spans are consecutive pieces of one chunk of the stream."""
    s = _random_tokens(4000, seed=5)
    write_shard(tmp_path / "fineweb_train_000000.bin", s)
    pattern = str(tmp_path / "*.bin")
    r0 = DistributedTokenLoader(pattern, 0, 2, "cpu").next_batch(256, 32, 1)
    r1 = DistributedTokenLoader(pattern, 1, 2, "cpu").next_batch(256, 32, 1)
    np.testing.assert_array_equal(r0[0].reshape(-1).numpy(), s[:128])
    np.testing.assert_array_equal(r0[1].reshape(-1).numpy(), s[1:129])
    np.testing.assert_array_equal(r1[0].reshape(-1).numpy(), s[129:257])
    np.testing.assert_array_equal(r1[1].reshape(-1).numpy(), s[130:258])


def test_token_stream_take_and_bad_batch(tmp_path):
    write_shard(tmp_path / "a_0.bin", [5, 6, 7])
    write_shard(tmp_path / "a_1.bin", [])
    write_shard(tmp_path / "a_2.bin", [8, 9])
    stream = TokenStream(str(tmp_path / "a_*.bin"))
    assert stream.take(4).tolist() == [5, 6, 7, 8]
    assert stream.take(4).tolist() == [9, 5, 6, 7]
    loader = DistributedTokenLoader(str(tmp_path / "a_*.bin"), 0, 1, "cpu")
    with pytest.raises(ValueError, match=r"must be a positive multiple of TRAIN_SEQ_LEN=4"):
        loader.next_batch(6, 4, 1)
    with pytest.raises(ValueError, match=r"rank 2 is not valid for world_size 2"):
        DistributedTokenLoader(str(tmp_path / "a_*.bin"), 2, 2, "cpu")


def test_two_ranks_together_equal_one_rank_with_accumulation(tmp_path):
    """One GPU with 2 micro-steps sees exactly the tokens that 2 GPUs see in one step, in the same order."""
    for i, n in enumerate((700, 900)):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", _random_tokens(n, seed=20 + i))
    pattern = str(tmp_path / "*.bin")
    single = DistributedTokenLoader(pattern, 0, 1, "cpu")
    ranks = [DistributedTokenLoader(pattern, r, 2, "cpu") for r in range(2)]
    for _ in range(5):  # 5 steps * 2 * 257 tokens wraps the 1600-token stream
        micro = [single.next_batch(512, 64, 2) for _ in range(2)]
        per_rank = [loader.next_batch(512, 64, 1) for loader in ranks]
        for (xs, ys), (xr, yr) in zip(micro, per_rank):
            assert torch.equal(xs, xr) and torch.equal(ys, yr)
