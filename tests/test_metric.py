"""The exact bpb metric: byte tables from a real (tiny) SentencePiece model, window layouts, the evaluator."""
import io
import json
import math
import os
import random
import socket

import pytest
import torch
import torch.nn.functional as F

from pgolf_kernels.metric import (
    BpbLuts,
    EvalResult,
    build_bpb_luts,
    evaluate_bpb,
    official_windows,
    sliding_windows,
)

spm = pytest.importorskip("sentencepiece")

WORDS = (
    "the quick brown fox jumps over lazy dog café naïve über 123 4567 hello world résumé 東京 data model token"
).split()


@pytest.fixture(scope="module")
def sp():
    """A tiny BPE model trained like the challenge's tokenizer (byte fallback, no dummy prefix)."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=384,
        character_coverage=0.999, byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False,
        control_symbols=["<sep>"], minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def _id(sp, piece):
    i = sp.piece_to_id(piece)
    assert sp.id_to_piece(i) == piece, f"piece {piece!r} not in the test vocabulary"
    return i


# ----------------------------------------------------------------------------------------------- tables


def test_luts_special_and_control_pieces_are_zero_byte_boundaries(sp):
    luts = build_bpb_luts(sp, sp.vocab_size())
    sep = _id(sp, "<sep>")
    assert sp.is_control(sep)
    for tid in (0, 1, 2, 3, sep):  # pad, bos, eos, unk, extra control symbol
        assert bool(luts.is_boundary[tid]), tid
        assert int(luts.base_bytes[tid]) == 0, tid
        assert not bool(luts.has_leading_space[tid]), tid
    assert luts.base_bytes.dtype == torch.int16
    assert luts.has_leading_space.dtype == torch.bool and luts.is_boundary.dtype == torch.bool


def test_luts_byte_pieces_count_one_byte(sp):
    luts = build_bpb_luts(sp, sp.vocab_size())
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256
    for i in byte_ids:
        assert sp.id_to_piece(i).startswith("<0x")
        assert int(luts.base_bytes[i]) == 1 and not bool(luts.is_boundary[i]) and not bool(luts.has_leading_space[i])


def test_luts_text_pieces(sp):
    luts = build_bpb_luts(sp, sp.vocab_size())
    cases = {"▁world": (5, True), "hello": (5, False), "café": (5, False), "▁東京": (6, True), "▁": (0, True), "é": (2, False)}
    for piece, (nbytes, space) in cases.items():
        i = _id(sp, piece)
        assert int(luts.base_bytes[i]) == nbytes, piece
        assert bool(luts.has_leading_space[i]) == space, piece
        assert not bool(luts.is_boundary[i]), piece


def test_luts_table_padded_to_model_vocab(sp):
    n = sp.vocab_size()
    luts = build_bpb_luts(sp, n + 7)
    assert luts.size == n + 7
    assert bool(luts.is_boundary[n:].all()) and int(luts.base_bytes[n:].abs().sum()) == 0
    assert build_bpb_luts(sp, 10).size == n  # never smaller than the tokenizer


def test_luts_from_model_path(sp, tmp_path):
    path = tmp_path / "tok.model"
    path.write_bytes(sp.serialized_model_proto())
    a, b = build_bpb_luts(str(path), 0 + sp.vocab_size()), build_bpb_luts(sp, sp.vocab_size())
    assert torch.equal(a.base_bytes, b.base_bytes) and torch.equal(a.is_boundary, b.is_boundary)
    with pytest.raises(FileNotFoundError):
        build_bpb_luts(str(tmp_path / "missing.model"), 10)


def test_leading_space_counts_after_normal_token_not_after_boundary(sp):
    luts = build_bpb_luts(sp, sp.vocab_size())
    bos, hello, world = 1, _id(sp, "hello"), _id(sp, "▁world")
    got = luts.target_bytes(torch.tensor([bos, hello, 2]), torch.tensor([world, world, world]))
    assert got.tolist() == [5, 6, 5]  # after BOS and EOS the ▁ is not a byte; after "hello" it is a space


def test_stream_bytes_equal_decoded_text_bytes(sp):
    """Over a BOS-separated stream of documents, the table bytes add up to the UTF-8 bytes of the text."""
    luts = build_bpb_luts(sp, sp.vocab_size())
    docs = ["hello world café", "東京 data ✓ model € token", "zq jumps over 4567 the lazy dog", "naïve résumé ☃"]
    stream, expected = [], 0
    for d in docs:
        ids = sp.encode(d)
        stream += [1] + ids
        expected += len(sp.decode(ids).encode("utf-8"))
    s = torch.tensor(stream)
    assert int(luts.target_bytes(s[:-1], s[1:]).sum()) == expected


# ----------------------------------------------------------------------------------------------- windows


def _check_tiling(windows, n, L, S):
    covered = []
    for k, (start, end, score_from) in enumerate(windows):
        assert 0 <= start <= score_from < end <= n
        assert end - start == min(L, n)
        if k == 0:
            assert start == 0 and score_from == 0
        else:
            assert end - score_from <= S
            assert score_from - start >= L - S  # every later-scored token has >= L - S tokens of context
        covered.extend(range(score_from, end))
    assert covered == list(range(n))  # each target exactly once, in order


@pytest.mark.parametrize("n", [1, 5, 63, 64, 65, 127, 128, 129, 1000, 1027])
@pytest.mark.parametrize("L,S", [(64, 64), (64, 1), (64, 16), (64, 63), (64, 48), (16, 5), (1, 1)])
def test_sliding_windows_score_every_target_once(n, L, S):
    _check_tiling(sliding_windows(n, L, S), n, L, S)


def test_sliding_windows_stride_equal_len_is_non_overlapping():
    assert sliding_windows(640, 64, 64) == official_windows(640, 64)
    assert official_windows(650, 64) == official_windows(640, 64)  # official drops the short remainder


def test_sliding_windows_rejects_bad_stride():
    for L, S in [(64, 0), (64, 65), (0, 1)]:
        with pytest.raises(ValueError):
            sliding_windows(100, L, S)


# ----------------------------------------------------------------------------------------------- evaluator

V = 384


def _tokens(n, seed=0, vocab=V):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(4, vocab, (n,), generator=g)
    t[torch.randint(0, n, (n // 50,), generator=g)] = 1  # sprinkle BOS so the boundary rule is exercised
    return t


def _bigram_table(seed=1, vocab=V):
    return torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 2


class Bigram:
    """Logits depend only on the current input token: context-independent."""

    def __init__(self, table):
        self.table = table

    def __call__(self, x, y):
        return self.table[x]


class WindowDependent(Bigram):
    """Logits also depend on the first token of the window: context-dependent."""

    def __call__(self, x, y):
        return self.table[x] + 0.7 * self.table[x[:, :1]]


def _reference_sums(model_fn, tokens, luts, windows):
    """Straight loop over windows, one at a time: (nll_sum, tokens, bytes)."""
    nll, cnt, nbytes = 0.0, 0, 0
    for start, end, score_from in windows:
        x = tokens[start:end][None].long()
        y = tokens[start + 1 : end + 1][None].long()
        ce = F.cross_entropy(model_fn(x, y)[0].float(), y[0], reduction="none").double()
        k = score_from - start
        nll += float(ce[k:].sum())
        cnt += end - score_from
        nbytes += int(luts.target_bytes(x[0, k:], y[0, k:]).sum())
    return nll, cnt, nbytes


def test_uniform_logits_give_log2_vocab_times_tokens_per_byte(sp):
    luts = build_bpb_luts(sp, sp.vocab_size())
    L = 32
    toks = _tokens(10 * L + 1, vocab=sp.vocab_size())
    res = evaluate_bpb(lambda x, y: torch.zeros(*x.shape, V), toks, luts, L, batch_tokens=3 * L)
    assert isinstance(res, EvalResult)
    exp_bytes = int(luts.target_bytes(toks[:-1], toks[1:]).sum())
    assert res.tokens == 10 * L and res.bytes == exp_bytes
    assert res.val_loss == pytest.approx(math.log(V), rel=1e-6)
    assert res.val_bpb == pytest.approx(math.log2(V) * res.tokens / res.bytes, rel=1e-6)


def test_official_layout_drops_remainder_and_matches_reference(sp):
    luts = build_bpb_luts(sp, sp.vocab_size())
    L = 16
    toks = _tokens(7 * L + 5)  # 4 targets past the last full sequence are not scored
    model = WindowDependent(_bigram_table())
    res = evaluate_bpb(model, toks, luts, L, batch_tokens=2 * L)
    nll, cnt, nbytes = _reference_sums(model, toks, luts, official_windows(toks.numel() - 1, L))
    assert res.tokens == cnt == 7 * L and res.bytes == nbytes
    assert res.val_loss == pytest.approx(nll / cnt, rel=1e-9)


def test_per_token_nll_model_matches_logits_model(sp):
    luts = build_bpb_luts(sp, sp.vocab_size())
    table = _bigram_table()
    logits_fn = WindowDependent(table)

    def nll_fn(x, y):
        lg = logits_fn(x, y)
        return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1), reduction="none").view(y.shape)

    toks = _tokens(8 * 32 + 1)
    for stride in (None, 8):
        a = evaluate_bpb(logits_fn, toks, luts, 32, stride=stride, batch_tokens=64)
        b = evaluate_bpb(nll_fn, toks, luts, 32, stride=stride, batch_tokens=64)
        assert (a.tokens, a.bytes) == (b.tokens, b.bytes)
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-12)
        assert a.val_bpb == pytest.approx(b.val_bpb, rel=1e-12)


def test_sliding_equals_non_overlapping_for_context_free_model_only(sp):
    luts = build_bpb_luts(sp, sp.vocab_size())
    L = 32
    toks = _tokens(12 * L + 1)
    table = _bigram_table()
    base = evaluate_bpb(Bigram(table), toks, luts, L)
    for S in (1, 8, 24, 32):
        slid = evaluate_bpb(Bigram(table), toks, luts, L, stride=S, batch_tokens=5 * L)
        assert (slid.tokens, slid.bytes) == (base.tokens, base.bytes)
        assert slid.val_loss == pytest.approx(base.val_loss, rel=1e-9)
    dep_base = evaluate_bpb(WindowDependent(table), toks, luts, L)
    dep_slid = evaluate_bpb(WindowDependent(table), toks, luts, L, stride=8)
    assert abs(dep_slid.val_loss - dep_base.val_loss) > 1e-3


def test_sliding_scores_tail_and_matches_reference_for_any_batching(sp):
    luts = build_bpb_luts(sp, sp.vocab_size())
    L, S = 32, 12
    toks = _tokens(10 * L + 7)
    model = WindowDependent(_bigram_table())
    windows = sliding_windows(toks.numel() - 1, L, S)
    nll, cnt, nbytes = _reference_sums(model, toks, luts, windows)
    assert cnt == toks.numel() - 1
    for batch_tokens in (L, 3 * L, 1000 * L):
        res = evaluate_bpb(model, toks, luts, L, stride=S, batch_tokens=batch_tokens)
        assert (res.tokens, res.bytes) == (cnt, nbytes)
        assert res.val_loss == pytest.approx(nll / cnt, rel=1e-9)


def test_uint16_tokens_and_autocast(sp):
    luts = build_bpb_luts(sp, sp.vocab_size())
    toks = _tokens(4 * 16 + 1)
    model = Bigram(_bigram_table())
    a = evaluate_bpb(model, toks, luts, 16)
    b = evaluate_bpb(model, toks.to(torch.uint16), luts, 16)
    assert a == b
    lin = torch.nn.Linear(V, V)

    def bf16_fn(x, y):
        out = lin(F.one_hot(x, V).float())
        assert out.dtype == torch.bfloat16  # autocast took effect; CE is still computed in fp32
        return out

    r = evaluate_bpb(bf16_fn, toks, luts, 16, autocast_dtype=torch.bfloat16)
    assert math.isfinite(r.val_bpb)


def test_evaluator_rejects_bad_inputs(sp):
    luts = build_bpb_luts(sp, sp.vocab_size())
    model = Bigram(_bigram_table())
    with pytest.raises(ValueError, match="ids in"):
        evaluate_bpb(model, torch.tensor([1, 2, V + 3] * 20), luts, 8)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        evaluate_bpb(model, _tokens(8), luts, 16)
    with pytest.raises(ValueError, match="smaller than one window"):
        evaluate_bpb(model, _tokens(65), luts, 16, batch_tokens=8)
    with pytest.raises(ValueError, match="model_fn"):
        evaluate_bpb(lambda x, y: torch.zeros(x.shape[0]), _tokens(65), luts, 16)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        evaluate_bpb(model, _tokens(65), luts, 16, rank=0, world_size=2)
    with pytest.raises(ValueError, match="stride"):
        evaluate_bpb(model, _tokens(65), luts, 16, stride=17)


# ----------------------------------------------------------------------------------------------- 2 ranks


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world_size, port, luts_tensors, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        luts = BpbLuts(*luts_tensors)
        toks = _tokens(9 * 16 + 6)
        model = WindowDependent(_bigram_table())
        results = {}
        for stride in (None, 5):
            r = evaluate_bpb(model, toks, luts, 16, stride=stride, batch_tokens=32, rank=rank, world_size=world_size)
            results[str(stride)] = [r.val_loss, r.val_bpb, r.tokens, r.bytes]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_one_process(sp, tmp_path):
    import torch.multiprocessing as mp

    luts = build_bpb_luts(sp, sp.vocab_size())
    mp.spawn(
        _dist_worker,
        args=(2, _free_port(), (luts.base_bytes, luts.has_leading_space, luts.is_boundary), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    toks = _tokens(9 * 16 + 6)
    model = WindowDependent(_bigram_table())
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for stride in (None, 5):
            one = evaluate_bpb(model, toks, luts, 16, stride=stride, batch_tokens=32)
            loss, bpb, ntok, nbytes = got[str(stride)]
            assert (ntok, nbytes) == (one.tokens, one.bytes)
            assert loss == pytest.approx(one.val_loss, rel=1e-12)
            assert bpb == pytest.approx(one.val_bpb, rel=1e-12)
