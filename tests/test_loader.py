"""Loader: (x, y) blocks, the shuffling permutation, ranks, exact resume, constant memory, eval blocks."""

import json
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chatforge.data.loader import IndexPermutation, TokenLoader, TokenStream, iter_eval_blocks
from chatforge.data.shard import write_shard
from chatforge.errors import ChatforgeError, DataError

VOCAB = 1 << 16


def make_shards(tmp_path, sizes, name="train", vocab=VOCAB):
    """Shards whose concatenation is 0, 1, 2, ...: a token's value is its stream offset."""
    files, start = [], 0
    for i, n in enumerate(sizes):
        path = tmp_path / f"{name}_{i:03d}.bin"
        write_shard(path, np.arange(start, start + n) % vocab, vocab_size=vocab, bos_id=0)
        files.append(path)
        start += n
    return files


def window_of(x: torch.Tensor, block_size: int) -> list[int]:
    """Which window each row of x is (row starts at offset window * block_size)."""
    first = x[:, 0]
    assert torch.all(first % block_size == 0)
    return (first // block_size).tolist()


def take(loader, n_batches):
    return [next(loader) for _ in range(n_batches)]


# --------------------------------------------------------------------------- permutation


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**32), epoch=st.integers(0, 50))
def test_permutation_is_a_bijection(n, seed, epoch):
    perm = IndexPermutation(n, seed, epoch)
    images = perm(np.arange(n))
    assert images.dtype == np.int64
    assert np.array_equal(np.sort(images), np.arange(n))
    # Any subset maps the same way as in the full call (it is a function of the index alone).
    some = np.arange(0, n, 7)
    assert np.array_equal(perm(some), images[some])


def test_permutation_depends_on_seed_and_epoch_and_shuffles():
    n = 1000
    base = IndexPermutation(n, seed=1, epoch=0)(np.arange(n))
    assert np.array_equal(base, IndexPermutation(n, seed=1, epoch=0)(np.arange(n)))
    assert not np.array_equal(base, IndexPermutation(n, seed=2, epoch=0)(np.arange(n)))
    assert not np.array_equal(base, IndexPermutation(n, seed=1, epoch=1)(np.arange(n)))
    assert (base == np.arange(n)).sum() < 20  # actually shuffled: few fixed points
    # Neighbouring inputs land far apart (not a rotation or a block swap).
    assert np.abs(np.diff(base)).mean() > n / 10


def test_permutation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="must be >= 1"):
        IndexPermutation(0, seed=0)
    with pytest.raises(ValueError, match="outside"):
        IndexPermutation(10, seed=0)(np.array([10]))


def test_permutation_handles_a_huge_domain():
    n = (1 << 40) + 3
    perm = IndexPermutation(n, seed=9)
    idx = np.array([0, 1, n - 1, 123456789], dtype=np.int64)
    out = perm(idx)
    assert np.all((out >= 0) & (out < n)) and len(set(out.tolist())) == 4


# --------------------------------------------------------------------------- training loader


def test_x_y_shift_shapes_and_dtype(tmp_path):
    files = make_shards(tmp_path, [500, 300, 201])  # windows cross file boundaries
    loader = TokenLoader(files, block_size=16, batch_size=4, seed=0)
    assert loader.n_windows == (1001 - 1) // 16 and loader.vocab_size == VOCAB
    for x, y in take(loader, 20):
        assert x.shape == y.shape == (4, 16)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        # Tokens equal their stream offset, so each row must be consecutive across file edges.
        assert torch.equal(y, x + 1)
        assert torch.equal(x - x[:, :1], torch.arange(16).expand(4, 16))


def test_uint32_shards_load_large_ids(tmp_path):
    path = tmp_path / "big.bin"
    tokens = np.arange(100_000, 100_100)
    write_shard(path, tokens, vocab_size=200_000, bos_id=0)
    x, y = next(TokenLoader([path], block_size=9, batch_size=3, seed=0))
    assert int(x.min()) >= 100_000 and torch.equal(y, x + 1)


def test_determinism_and_seeds(tmp_path):
    files = make_shards(tmp_path, [2000])
    a = take(TokenLoader(files, 8, 5, seed=11), 10)
    b = take(TokenLoader(files, 8, 5, seed=11), 10)
    c = take(TokenLoader(files, 8, 5, seed=12), 10)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


@pytest.mark.parametrize(("n_tokens", "block_size", "batch_size"), [(1001, 10, 7), (161, 8, 4), (34, 3, 5)])
def test_every_window_once_per_epoch(tmp_path, n_tokens, block_size, batch_size):
    files = make_shards(tmp_path, [n_tokens // 2, n_tokens - n_tokens // 2])
    loader = TokenLoader(files, block_size, batch_size, seed=3)
    n = loader.n_windows
    assert n == (n_tokens - 1) // block_size
    epochs = 3
    seen = []
    while len(seen) < epochs * n:
        x, _ = next(loader)
        seen += window_of(x, block_size)
    for e in range(epochs):
        assert sorted(seen[e * n : (e + 1) * n]) == list(range(n)), f"epoch {e}"
    # Each epoch has its own order (for more than a handful of windows).
    if n > 10:
        assert seen[:n] != seen[n : 2 * n]
    # Batches are full even across an epoch boundary, and the epoch counter follows.
    assert loader.epoch == len(seen) // n


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_partition_the_global_batch(tmp_path, world_size):
    files = make_shards(tmp_path, [700, 300])
    bs, batch = 9, 4
    single = TokenLoader(files, bs, batch * world_size, seed=5)
    ranks = [TokenLoader(files, bs, batch, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    all_windows = []
    for _ in range(16):  # 16 global batches of >= 8 cross an epoch boundary (n_windows = 111)
        xg, yg = next(single)
        parts = [next(r) for r in ranks]
        # Together the ranks see exactly what one process with the global batch sees.
        assert torch.equal(torch.cat([x for x, _ in parts]), xg)
        assert torch.equal(torch.cat([y for _, y in parts]), yg)
        all_windows += window_of(xg, bs)
    n = single.n_windows
    assert sorted(all_windows[:n]) == list(range(n))


def test_ranks_are_disjoint_and_cover_an_epoch(tmp_path):
    files = make_shards(tmp_path, [961])
    bs, batch, world = 10, 4, 3  # 96 windows = 8 global batches of 12
    ranks = [TokenLoader(files, bs, batch, seed=8, rank=r, world_size=world) for r in range(world)]
    per_rank = [[w for _ in range(8) for w in window_of(next(r)[0], bs)] for r in ranks]
    sets = [set(p) for p in per_rank]
    assert all(len(s) == len(p) for s, p in zip(sets, per_rank))  # no repeats within a rank
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(range(96))


def test_bad_rank_and_sizes_are_rejected(tmp_path):
    files = make_shards(tmp_path, [100])
    with pytest.raises(ChatforgeError, match="rank must be in"):
        TokenLoader(files, 4, 2, rank=2, world_size=2)
    with pytest.raises(ChatforgeError, match="batch_size must be >= 1"):
        TokenLoader(files, 4, 0)
    with pytest.raises(ChatforgeError, match="block_size must be >= 1"):
        TokenLoader(files, 0, 2)
    with pytest.raises(ChatforgeError, match="no shard files"):
        TokenLoader([], 4, 2)


def test_block_size_larger_than_data(tmp_path):
    files = make_shards(tmp_path, [30, 20])
    with pytest.raises(ChatforgeError, match=r"block_size 50 needs 51 tokens.*train_000\.bin, train_001\.bin.*only 50"):
        TokenLoader(files, block_size=50, batch_size=1)
    # Exactly enough for one window works.
    x, y = next(TokenLoader(files, block_size=49, batch_size=2))
    assert x[0].tolist() == list(range(49)) == x[1].tolist()


def test_mixed_tokenizers_are_rejected(tmp_path):
    a = make_shards(tmp_path, [50])
    b = tmp_path / "other.bin"
    write_shard(b, np.arange(50), vocab_size=300, bos_id=1)
    with pytest.raises(DataError, match=r"other\.bin: vocab_size 300 / bos_id 1 differ"):
        TokenLoader([*a, b], 4, 2)


@pytest.mark.parametrize("stop_after", [1, 5, 13, 14, 30])
def test_resume_gives_exactly_the_continuation(tmp_path, stop_after):
    files = make_shards(tmp_path, [400, 260])  # 73 windows of 9; batch 5 crosses epochs at batch 15, 30
    ref = TokenLoader(files, 9, 5, seed=21)
    expected = take(ref, stop_after + 20)

    first = TokenLoader(files, 9, 5, seed=21)
    take(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores: plain JSON
    resumed = TokenLoader(files, 9, 5, seed=21)
    resumed.load_state_dict(state)
    assert resumed.epoch == first.epoch
    for (xe, ye), (xr, yr) in zip(expected[stop_after:], take(resumed, 20)):
        assert torch.equal(xe, xr) and torch.equal(ye, yr)


def test_resume_with_another_world_size_continues_the_stream(tmp_path):
    files = make_shards(tmp_path, [800])
    ref = TokenLoader(files, 8, 6, seed=2)
    expected = torch.cat([x for x, _ in take(ref, 8)])
    first = TokenLoader(files, 8, 6, seed=2)
    head = torch.cat([x for x, _ in take(first, 3)])
    state = first.state_dict()
    ranks = [TokenLoader(files, 8, 3, seed=2, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    tail = torch.cat([torch.cat([next(r)[0] for r in ranks]) for _ in range(5)])
    assert torch.equal(torch.cat([head, tail]), expected)


def test_resume_with_different_files_or_settings_is_a_clear_error(tmp_path):
    files = make_shards(tmp_path, [300, 200])
    loader = TokenLoader(files, 8, 4, seed=1)
    take(loader, 3)
    state = loader.state_dict()

    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = make_shards(other_dir, [300, 250])
    with pytest.raises(ChatforgeError, match=r"different shards: saved \[train_000\.bin \(300 tokens\), "
                                              r"train_001\.bin \(200 tokens\)\], now .*250 tokens"):
        TokenLoader(other, 8, 4, seed=1).load_state_dict(state)
    with pytest.raises(ChatforgeError, match="different shards"):
        TokenLoader(files[:1], 8, 4, seed=1).load_state_dict(state)
    with pytest.raises(ChatforgeError, match="saved with seed 1, this loader has 2"):
        TokenLoader(files, 8, 4, seed=2).load_state_dict(state)
    with pytest.raises(ChatforgeError, match="saved with block_size 8, this loader has 7"):
        TokenLoader(files, 7, 4, seed=1).load_state_dict(state)
    with pytest.raises(ChatforgeError, match="missing position"):
        TokenLoader(files, 8, 4, seed=1).load_state_dict({k: v for k, v in state.items() if k != "position"})
    with pytest.raises(ChatforgeError, match="out of range"):
        TokenLoader(files, 8, 4, seed=1).load_state_dict({**state, "position": 10_000})
    with pytest.raises(ChatforgeError, match="version 99"):
        TokenLoader(files, 8, 4, seed=1).load_state_dict({**state, "version": 99})


def test_loader_keeps_memmaps_and_constant_memory(tmp_path):
    n = 1_000_000  # 2 MB on disk as uint16
    path = tmp_path / "big.bin"
    write_shard(path, np.arange(n) % VOCAB, vocab_size=VOCAB, bos_id=0)
    tracemalloc.start()
    try:
        loader = TokenLoader([path], block_size=64, batch_size=8, seed=0)
        for _ in range(50):
            next(loader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A whole-shard copy would be 2 MB (8 MB as int64); the loader needs a few batches' worth.
    assert peak < 500_000, peak
    assert all(isinstance(m, np.memmap) for m in loader.stream._maps)
    arrays = [v for v in vars(loader).values() if isinstance(v, np.ndarray) and not isinstance(v, np.memmap)]
    arrays += [v for v in vars(loader.stream).values() if isinstance(v, np.ndarray) and not isinstance(v, np.memmap)]
    assert all(a.nbytes < 10_000 for a in arrays)


def test_token_stream_reads_across_files(tmp_path):
    stream = TokenStream(make_shards(tmp_path, [3, 1, 5]))
    assert stream.n_tokens == 9 and stream.starts == [0, 3, 4, 9]
    out = np.empty(7, dtype=np.int64)
    stream.read_into(out, 2)
    assert out.tolist() == [2, 3, 4, 5, 6, 7, 8]


# --------------------------------------------------------------------------- evaluation


def test_eval_blocks_are_deterministic_and_cover_the_val_shard(tmp_path):
    files = make_shards(tmp_path, [103], name="val")
    blocks = list(iter_eval_blocks(files, block_size=10, batch_size=4))
    again = list(iter_eval_blocks(files, block_size=10, batch_size=4))
    assert len(blocks) == 3  # 10 windows: 4 + 4 + 2
    assert [x.shape[0] for x, _ in blocks] == [4, 4, 2]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(blocks, again))
    x = torch.cat([x for x, _ in blocks]).flatten()
    y = torch.cat([y for _, y in blocks]).flatten()
    assert x.tolist() == list(range(100))  # every token of the shard but the unusable tail, in order
    assert y.tolist() == list(range(1, 101))


def test_eval_blocks_max_batches_and_errors(tmp_path):
    files = make_shards(tmp_path, [103], name="val")
    assert len(list(iter_eval_blocks(files, 10, 4, max_batches=2))) == 2
    assert len(list(iter_eval_blocks(files, 10, 4, max_batches=100))) == 3
    with pytest.raises(ChatforgeError, match="max_batches"):
        iter_eval_blocks(files, 10, 4, max_batches=0)
    with pytest.raises(ChatforgeError, match="block_size 200 needs 201 tokens"):
        iter_eval_blocks(files, 200, 4)  # raised at the call, not at the first next()
    with pytest.raises(ChatforgeError, match="batch_size"):
        iter_eval_blocks(files, 10, 0)
