"""The compiled kernel on several threads: tiles shared by threads through row cursors
(forward and grad_input), Python jobs joining a shared one, and the compiled pool
(csrc/pool.hpp: weights packed once before any tile reads them, concurrent callers, a
forked child)."""

from __future__ import annotations

import numpy as np
import pytest

import convtranspose as ct
from convtranspose import _native_kernel as native


@pytest.fixture(autouse=True)
def _tasks_prepared_every_call(monkeypatch):
    """These tests watch (and alter) the calls a call prepares: every call prepares its
    own, none replays a recording of an earlier one (those: test_recordings.py)."""
    from convtranspose import _execute
    monkeypatch.setattr(_execute._Recording, "find", classmethod(lambda cls, *a: None))


def _poisoned(monkeypatch):
    """Results start as NaN (not recycled memory that may hold the right answer), so a row
    that no call computes shows."""
    from convtranspose import _execute
    monkeypatch.setattr(_execute, "result_empty",
                        lambda shape, dtype: np.full(shape, np.nan, dtype))


SHARED_SHAPES = [  # (C_in, C_out, groups, stride): the three kernel modes, one phase or eight
    (16, 24, 1, 1), (16, 24, 1, 2), (8, 2, 1, 1), (12, 12, 12, 2), (8, 16, 2, 1)]


@pytest.mark.parametrize("c_in,c_out,groups,stride", SHARED_SHAPES,
                         ids=[f"ci{a}-co{b}-g{c}-s{d}" for a, b, c, d in SHARED_SHAPES])
def test_threads_sharing_a_tile_compute_every_row_once(c_in, c_out, groups, stride, rng,
                                                       monkeypatch, small_calls_threaded):
    """Three calls start together on each tile and claim its rows through one cursor: the
    result holds the bits of one call computing every row, whichever call took which."""
    x = rng.standard_normal((2, 5, 9, 7, c_in)).astype(np.float32)
    w = rng.standard_normal((c_out, 3, 3, 3, c_in // groups)).astype(np.float32)
    kw = dict(stride=stride, padding=1, groups=groups)
    p = ct.plan(x.shape, w.shape, **kw, algorithm="native", threads=1)
    alone = ct.run_plan(p, x, w).copy()
    shared_calls = _three_calls_per_shared_tile(monkeypatch)
    _poisoned(monkeypatch)
    shared = ct.run_plan(ct.plan(x.shape, w.shape, **kw, algorithm="native", threads=2), x, w)
    assert shared_calls, "the plan on two threads made no tile shared"
    np.testing.assert_array_equal(shared, alone)


@pytest.mark.parametrize("c_out", [160, 40], ids=["chunks", "one-chunk"])
def test_threads_share_a_few_rows_by_channel_chunks(c_out, rng, monkeypatch,
                                                    small_calls_threaded):
    """A few rows of wide channels (fewer row groups than twice the sharers): the calls
    claim (row group, channel chunk) pairs instead of rows, each pair computed whole by
    one of them; with one chunk (40 outputs), the rows fewer than a group are cut into
    one group per sharer. Either way the bits of one call computing everything, and
    every output written."""
    x = rng.standard_normal((1, 2, 2, 3, 32)).astype(np.float32)
    w = rng.standard_normal((c_out, 3, 3, 3, 32)).astype(np.float32)
    kw = dict(padding=1)
    alone = ct.run_plan(ct.plan(x.shape, w.shape, **kw, algorithm="native", threads=1),
                        x, w).copy()
    shared_calls = _three_calls_per_shared_tile(monkeypatch)
    _poisoned(monkeypatch)
    shared = ct.run_plan(ct.plan(x.shape, w.shape, **kw, algorithm="native", threads=2), x, w)
    assert shared_calls, "the plan on two threads made no tile shared"
    np.testing.assert_array_equal(shared, alone)


@pytest.mark.parametrize("c_in,c_out,groups,stride", SHARED_SHAPES,
                         ids=[f"ci{a}-co{b}-g{c}-s{d}" for a, b, c, d in SHARED_SHAPES])
def test_grad_input_tiles_shared_by_threads_hold_the_same_bits(c_in, c_out, groups, stride,
                                                              rng, monkeypatch):
    from convtranspose import _vjp
    from convtranspose._api import spec_for
    monkeypatch.setattr(_vjp, "GROUPS_SIDE_BY_SIDE", False)  # its tiles, not that pass

    x = rng.standard_normal((2, 5, 9, 7, c_in)).astype(np.float32)
    w = rng.standard_normal((c_out, 3, 3, 3, c_in // groups)).astype(np.float32)
    spec, _, _ = spec_for(3, x, w, stride=stride, padding=1, groups=groups)
    cot = rng.standard_normal(spec.output_shape).astype(np.float32)
    # Alone, or beside grad_weight (in one queue with its units, or in its pass where
    # grad_weight sums few values per tap: another order of sums, so its own reference).
    alone = {need_weight: _vjp.vjp_arrays(spec, x, w, cot, need_weight=need_weight,
                                          algorithm="native", threads=1)[0].copy()
             for need_weight in (False, True)}
    shared_calls = _three_calls_per_shared_tile(monkeypatch)
    monkeypatch.setattr(_vjp, "result_empty", lambda shape, dtype: np.full(shape, np.nan, dtype))
    for need_weight in (False, True):
        gx, _ = _vjp.vjp_arrays(spec, x, w, cot, need_weight=need_weight, algorithm="native",
                                threads=2)
        np.testing.assert_array_equal(gx, alone[need_weight])
    assert shared_calls


def _three_calls_per_shared_tile(monkeypatch) -> list:
    """Run each shared tile as three calls started together, on Python threads, so that
    they claim its rows concurrently (on either path: kernel calls made by Python jobs, or
    tasks for the compiled pool); returns the list of the tiles so run."""
    import threading

    real = native.correlate
    shared_calls = []

    def three_at_once(fn) -> None:
        start = threading.Barrier(3)

        def one():
            start.wait()
            fn()

        workers = [threading.Thread(target=one) for _ in range(3)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()

    def correlate(*args, into=None, **kw):
        *head, cursor, sharers = args
        if not cursor or into is not None:
            return real(*args, into=into, **kw)
        shared_calls.append(args)
        three_at_once(lambda: real(*head, cursor, 3, **kw))

    def run_tasks(tasks, threads):
        for task in tasks:
            if task.shared:
                shared_calls.append(task)
                three_at_once(task.run_here)
            else:
                task.run_here()

    monkeypatch.setattr(native, "correlate", correlate)
    monkeypatch.setattr(native, "run_tasks", run_tasks)
    return shared_calls


def test_a_call_computes_only_the_rows_left_unclaimed(rng, monkeypatch, small_calls_threaded):
    """With the first k rows of the tile claimed already (by another thread, as far as the
    kernel knows), a call computes the others and leaves those k alone."""
    import ctypes

    x = rng.standard_normal((1, 4, 6, 5, 8)).astype(np.float32)
    w = rng.standard_normal((16, 3, 3, 3, 8)).astype(np.float32)
    p = ct.plan(x.shape, w.shape, padding=1, algorithm="native", threads=2)
    assert len(p.tasks) == 1  # stride 1: one phase, one tile whose rows are (n, d, h)
    full = ct.run_plan(ct.plan(x.shape, w.shape, padding=1, algorithm="native", threads=1),
                       x, w).copy()
    real = native.correlate
    rows = 4 * 6
    for claimed in (0, 7, rows):
        def pre_claimed(*args, claimed=claimed, **kw):
            *head, cursor, sharers = args
            assert cursor and sharers == 2
            ctypes.c_int64.from_address(cursor).value = claimed  # before the call runs
            return real(*args, **kw)

        with monkeypatch.context() as patch:
            _poisoned(patch)
            patch.setattr(native, "correlate", pre_claimed)
            out = ct.run_plan(p, x, w).reshape(rows, -1)
        assert np.isnan(out[:claimed]).all()
        np.testing.assert_array_equal(out[claimed:], full.reshape(rows, -1)[claimed:])


def test_threads_left_without_a_job_join_a_shared_one():
    """run_jobs: every job runs; a thread that finds no job left joins a Shared one still
    running (here: units taken under a lock, 1 ms each); an error in one surfaces."""
    import threading
    import time

    from convtranspose._execute import Shared, run_jobs

    lock = threading.Lock()
    units = list(range(20))
    done: list[tuple[int, int]] = []
    plain: list[str] = []

    def shared_work():
        while True:
            with lock:
                if not units:
                    return
                unit = units.pop()
            time.sleep(1e-3)
            done.append((unit, threading.get_ident()))

    run_jobs([lambda: plain.append("a"), Shared(shared_work), lambda: plain.append("b")], 2)
    assert sorted(u for u, _ in done) == list(range(20)) and sorted(plain) == ["a", "b"]
    assert len({ident for _, ident in done}) == 2  # both threads worked on it

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_jobs([Shared(broken), lambda: None], 2)


@pytest.fixture
def two_threads():
    before = ct._plan._threads
    ct.set_num_threads(2)
    yield
    ct.set_num_threads(before)


def test_pool_packs_each_weight_once_before_any_tile_reads_it(rng, monkeypatch,
                                                              small_calls_threaded):
    """Stride 2: eight phase groups, each packing its weights (a `native.once`) as the first
    of its tiles needs them, on whichever pool thread that is. The packed buffers start as
    NaN, so a tile that read them before the packing was done would show; and a packing
    run twice would still give the right answer, so the packs are counted."""
    from convtranspose import _memory

    x = rng.standard_normal((2, 6, 7, 5, 8)).astype(np.float32)
    w = rng.standard_normal((16, 3, 3, 3, 8)).astype(np.float32)
    kw = dict(stride=2, padding=1)
    alone = ct.run_plan(ct.plan(x.shape, w.shape, **kw, algorithm="native", threads=1), x, w)
    real_empty = _memory.Scratch.empty
    monkeypatch.setattr(_memory.Scratch, "empty", lambda self, count, dtype: np.full(
        real_empty(self, count, dtype).shape, np.nan, dtype))
    onces = []
    real_once = native.once
    monkeypatch.setattr(native, "once", lambda calls: onces.append(len(calls))
                        or real_once(calls))
    tasks_run = []
    real_run = native.run_tasks
    monkeypatch.setattr(native, "run_tasks", lambda tasks, threads: tasks_run.append(
        (len(tasks), threads)) or real_run(tasks, threads))
    p = ct.plan(x.shape, w.shape, **kw, algorithm="native", threads=3)
    for _ in range(5):
        np.testing.assert_array_equal(ct.run_plan(p, x, w), alone)
    assert len(onces) == 5 * len(p.phase_groups) and len(p.phase_groups) > 1
    assert tasks_run and all(n >= len(p.phase_groups) and t == 3 for n, t in tasks_run)


def test_pool_tiles_of_one_weight_wait_for_its_packing(rng, monkeypatch, small_calls_threaded):
    """One phase group cut into many tiles (tiles shared by threads are normally cut only
    for locality): the threads start on different tiles of the same weight together, and
    all but the one packing it must wait for the packing (into NaN-filled memory)."""
    from convtranspose import _memory, _plan

    x = rng.standard_normal((2, 12, 12, 8, 64)).astype(np.float32)
    w = rng.standard_normal((64, 3, 3, 3, 64)).astype(np.float32)
    alone = ct.run_plan(ct.plan(x.shape, w.shape, padding=1, algorithm="native", threads=1),
                        x, w)
    monkeypatch.setattr(_plan, "SHARED_TILE_BYTES", 1)
    _plan._make_plan.cache_clear()
    real_empty = _memory.Scratch.empty
    monkeypatch.setattr(_memory.Scratch, "empty", lambda self, count, dtype: np.full(
        real_empty(self, count, dtype).shape, np.nan, dtype))
    p = ct.plan(x.shape, w.shape, padding=1, algorithm="native", threads=3)
    assert len(p.phase_groups) == 1 and len(p.tasks) >= 6
    for _ in range(40):
        np.testing.assert_array_equal(ct.run_plan(p, x, w), alone)


def test_pool_serves_concurrent_callers(rng, two_threads):
    """Two Python threads call at once, each on two threads: one batch has the pool's
    threads, the other runs on its caller; both give the bits of a call alone."""
    import threading

    x = rng.standard_normal((1, 8, 16, 16, 32)).astype(np.float32)
    w = rng.standard_normal((32, 3, 3, 3, 32)).astype(np.float32)
    alone = ct.conv_transpose3d(x, w, stride=2, padding=1).copy()
    failures = []

    def caller():
        for _ in range(10):
            y = ct.conv_transpose3d(x, w, stride=2, padding=1)
            if not np.array_equal(y, alone):
                failures.append(1)

    callers = [threading.Thread(target=caller) for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in callers) and not failures


def _forked_call(queue) -> None:
    x = np.ones((1, 8, 16, 16, 32), np.float32)
    w = np.ones((32, 3, 3, 3, 32), np.float32)
    queue.put(float(ct.conv_transpose3d(x, w, stride=2, padding=1).sum()))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork is POSIX")
def test_pool_works_in_a_forked_child(two_threads):
    """A child forked after the pool started has none of its threads (and may hold a
    copy of a lock that a parent thread held at the fork): its calls still finish, with
    the parent's result, on a pool of its own."""
    import multiprocessing

    x = np.ones((1, 8, 16, 16, 32), np.float32)
    w = np.ones((32, 3, 3, 3, 32), np.float32)
    expected = float(ct.conv_transpose3d(x, w, stride=2, padding=1).sum())
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_forked_call, args=(queue,))
    child.start()
    child.join(timeout=60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0
    assert queue.get(timeout=5) == expected


@pytest.mark.parametrize("c_out", [12, 40, 70, 200])  # from 12: CHANNELS mode
def test_weights_packed_in_pieces_by_every_thread_hold_the_same_layout(c_out, rng,
                                                                     monkeypatch):
    """Fewer phase groups than threads: the weight is packed now, in pieces that every
    thread takes (runs of taps within one chunk of columns, or whole chunks): the result
    has the bits of the packing in one piece."""
    from convtranspose import _execute, _plan
    monkeypatch.setattr(_plan, "NATIVE_SERIAL_BELOW_SECONDS", 0.0)  # two threads however small
    x = rng.standard_normal((1, 3, 4, 5, 24)).astype(np.float32)
    w = rng.standard_normal((c_out, 3, 3, 3, 24)).astype(np.float32)
    alone = ct.run_plan(ct.plan(x.shape, w.shape, padding=1, algorithm="native", threads=1),
                        x, w).copy()
    pieces = []
    real = _execute._pack_pieces
    monkeypatch.setattr(_execute, "PARALLEL_PACK_BYTES", 0)
    monkeypatch.setattr(_execute, "_pack_pieces",
                        lambda *a: (pieces.append(len(a[6])), real(*a))[1])
    got = ct.run_plan(ct.plan(x.shape, w.shape, padding=1, algorithm="native", threads=2), x, w)
    assert pieces, "the weight was not packed in pieces"
    np.testing.assert_array_equal(got, alone)


def test_pool_tasks_writing_the_same_rows_say_so(rng, monkeypatch, small_calls_threaded):
    """Stride 2 along D, H and W: the phases of one D and H residue interleave their pixels
    in the same output rows, and their tasks carry one `rows` number (a thread about to
    start one first joins the other, csrc/pool.hpp); other residues carry others. The
    result holds the bits of one thread."""
    x = rng.standard_normal((1, 4, 5, 6, 8)).astype(np.float32)
    w = rng.standard_normal((12, 3, 3, 3, 8)).astype(np.float32)
    kw = dict(stride=2, padding=1)
    alone = ct.run_plan(ct.plan(x.shape, w.shape, **kw, algorithm="native", threads=1),
                        x, w).copy()
    seen: list = []
    real = native.run_tasks
    monkeypatch.setattr(native, "run_tasks", lambda tasks, threads: (
        seen.extend(tasks), real(tasks, threads)))
    shared = ct.run_plan(ct.plan(x.shape, w.shape, **kw, algorithm="native", threads=2), x, w)
    np.testing.assert_array_equal(shared, alone)
    assert len(seen) == 8 and all(t.rows >= 0 for t in seen)
    counts = sorted(sum(t.rows == u.rows for u in seen) for t in seen)
    assert counts == [2] * 8  # four D/H residues, each with its two W residues
