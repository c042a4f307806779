"""Sampler: data position is a number; nothing is replayed."""

import time

import pytest

from bigtrain.sampler import Sampler


def test_take_deep_cursor_costs_the_same_and_is_consistent():
    s = Sampler(1000, seed=0)
    skipped = [(10**9 + 5, 10**9 + 9)]
    t0 = time.perf_counter()
    shallow, _ = s.take(0, 256, skipped)
    t_shallow = time.perf_counter() - t0
    t0 = time.perf_counter()
    deep, end = s.take(10**9, 256, skipped)
    t_deep = time.perf_counter() - t0
    assert shallow == list(range(256))
    assert deep[:5] == list(range(10**9, 10**9 + 5)) and deep[5] == 10**9 + 9
    assert end == deep[-1] + 1 == 10**9 + 260
    assert t_deep < 0.05 and t_deep < 20 * t_shallow + 0.01  # no walk from 0 to the cursor
    for cursor in (0, 7, 10**9):
        whole, whole_end = s.take(cursor, 30, skipped)
        first, mid = s.take(cursor, 12, skipped)
        second, second_end = s.take(mid, 18, skipped)
        assert first + second == whole and second_end == whole_end
    # Sample ids at a deep position: one permutation computed, same answer either way.
    assert s.sample_ids(deep) == [s.sample_id(i) for i in deep]


def test_take_never_returns_skipped_and_zero_count():
    s = Sampler(50, seed=3)
    skipped = [(20, 25), (3, 5), (24, 30), (30, 31), (100, 100)]
    taken, end = s.take(0, 60, skipped)
    assert len(taken) == 60 and len(set(taken)) == 60 and taken == sorted(taken)
    for start, stop in skipped:
        assert not any(start <= i < stop for i in taken)
    assert taken[:5] == [0, 1, 2, 5, 6] and end == taken[-1] + 1
    # A cursor inside a skipped range jumps to its end.
    assert s.take(21, 2, skipped) == ([31, 32], 33)
    assert s.take(9, 0, skipped) == ([], 9)
    with pytest.raises(ValueError):
        s.take(-1, 1, [])


def test_merge_ranges():
    assert Sampler.merge_ranges([(5, 8), (0, 2), (2, 3), (7, 9), (4, 4)]) == [(0, 3), (5, 9)]
    assert Sampler.merge_ranges([[1, 10], [2, 3]]) == [(1, 10)]
    assert Sampler.merge_ranges([]) == []


def test_epochs_are_permutations_and_differ():
    n = 97
    s = Sampler(n, seed=1)
    epochs = [[s.sample_id(e * n + k) for k in range(n)] for e in range(3)]
    for ids in epochs:
        assert sorted(ids) == list(range(n))
    assert epochs[0] != epochs[1] != epochs[2]
    # Going back to an evicted epoch recomputes the same permutation.
    assert [s.sample_id(k) for k in range(n)] == epochs[0]
    assert s.sample_ids(list(range(n - 3, n + 3))) == epochs[0][-3:] + epochs[1][:3]


def test_shuffle_false_is_file_order():
    s = Sampler(10, seed=123, shuffle=False)
    assert [s.sample_id(i) for i in range(25)] == list(range(10)) * 2 + list(range(5))


def test_seed_determines_order():
    a, b, c = Sampler(200, seed=7), Sampler(200, seed=7), Sampler(200, seed=8)
    ids_a = [a.sample_id(i) for i in range(400)]
    assert ids_a == [b.sample_id(i) for i in range(400)]
    assert ids_a != [c.sample_id(i) for i in range(400)]
    with pytest.raises(ValueError):
        Sampler(0, seed=0)


# ------------------------------------------------------------------------------------------------
# Skips by sample identity (issue 11 item 4): they hold in every epoch and at any batch/world size.

from bigtrain.sampler import SkipSet, blocks_of_documents, implicated_documents  # noqa: E402
import torch  # noqa: E402


def test_skipped_ids_never_reappear_in_any_epoch_or_batch_size():
    n = 101
    s = Sampler(n, seed=5)
    bad = SkipSet([3, 50, 77, 100])
    for batch in (1, 4, 7):  # a change of micro batch or world size only changes the count per take
        cursor, seen = 0, []
        while cursor < 3 * n:  # three epochs, each a different permutation
            taken, cursor = s.take(cursor, batch, (), bad)
            seen += s.sample_ids(taken)
        assert not {3, 50, 77, 100} & set(seen)
        # every other sample still comes once per epoch
        first_epoch = [sid for sid in seen[: n - 4]]
        assert sorted(first_epoch) == sorted(set(range(n)) - {3, 50, 77, 100})
    # Split takes equal one take, also with ids skipped (the position stays one number).
    whole, end = s.take(95, 30, (), bad)
    a, mid = s.take(95, 11, (), bad)
    b, end2 = s.take(mid, 19, (), bad)
    assert a + b == whole and end == end2


def test_skipped_ids_cost_nothing_at_a_deep_cursor():
    s = Sampler(10**5, seed=0)
    bad = SkipSet(range(0, 10**5, 7))  # 14,286 ids: 1/7 of the data
    t0 = time.perf_counter()
    taken, _ = s.take(10**9, 1024, (), bad)
    elapsed = time.perf_counter() - t0
    assert len(taken) == 1024 and not any(sid % 7 == 0 for sid in s.sample_ids(taken))
    assert elapsed < 0.5  # one permutation (O(N)) plus O(count log S); no walk from 0
    with pytest.raises(ValueError, match="every one"):
        Sampler(3, seed=0).take(0, 1, (), SkipSet([0, 1, 2]))


def test_documents_blocks_and_conviction():
    # blocks: 0:[0,0] 1:[0,1] 2:[1,1] 3:[1,1] 4:[1,3] 5:[3,3] 6:[4,4]  (doc 2 lies inside block 4)
    td = torch.tensor([[0, 0], [0, 1], [1, 1], [1, 1], [1, 3], [3, 3], [4, 4]])
    assert blocks_of_documents(td, [1]) == [1, 2, 3, 4]
    assert blocks_of_documents(td, [2]) == [4]
    assert blocks_of_documents(td, [0, 4]) == [0, 1, 6]
    # block 2 has doc 1 alone: doc 1 is convicted; block 1 (docs 0, 1) does not convict doc 0
    assert implicated_documents(td, [1, 2]) == [1]
    # a shared block alone convicts nobody; two shared blocks of doc 3 convict it
    assert implicated_documents(td, [4]) == []
    assert implicated_documents(td, [4, 5]) == [3]  # block 5 is doc 3 alone; doc 1 is in block 4 only
    assert implicated_documents(td, [2], max_blocks=3) == []  # doc 1 has 4 blocks: too long
