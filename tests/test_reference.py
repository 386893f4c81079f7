"""Ours against the slow reference (tests/reference.py) over the settings grid, for every
algorithm the planner can pick, for tiny workspaces that force many tiles, and for one and
two threads."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from reference import (
    Case,
    all_cases,
    conv_transpose_loops,
    conv_transpose_ref,
    magnitude_ref,
)

import convtranspose as ct
from convtranspose._plan import ALGORITHMS, workspace_limit
from convtranspose.kernels import REGISTRY

# The settings grid's channels are too few for 'winograd' (a stride-1 D axis of three
# taps, >= 16 input channels per group): these cases let every test below reach it.
WINOGRAD_CASES = [
    Case("wino-k3s1p1", 2, (5, 3, 4), 16, 12, (3, 3, 3), padding=1),
    Case("wino-aniso", 1, (4, 3, 5), 32, 13, (3, 2, 3), stride=(1, 2, 1),
         padding=(2, 0, 1), dilation=(1, 1, 2), output_padding=(0, 1, 0)),
]
CASES = all_cases() + WINOGRAD_CASES
FUNCS = {1: ct.conv_transpose1d, 2: ct.conv_transpose2d, 3: ct.conv_transpose3d}
DTYPES = ["float16", "bfloat16", "float32", "float64"]


def _algorithms(case: Case, workspace: int | None = None) -> list[str]:
    """Every algorithm that fits this case within `workspace` (None: the default limit),
    as its kernel says (`Kernel.fits`)."""
    spec = ct.plan(case.input_shape, case.weight_shape, **case.kwargs).spec
    limit = workspace_limit(spec, workspace)
    return [name for name, kernel in REGISTRY.items() if kernel.fits(spec, limit) is None]


def _operands(case: Case, rng, random_array, dtype="float32"):
    return (random_array(rng, case.input_shape, dtype),
            random_array(rng, case.weight_shape, dtype))


# ---- the reference itself -------------------------------------------------------------

TINY = [c for c in CASES if c.batch * math.prod(c.in_spatial) * math.prod(c.kernel) <= 300]


@pytest.mark.parametrize("case", TINY, ids=[c.id for c in TINY])
def test_reference_equals_scalar_loops(case, rng, random_array):
    # The check of the check: the reference used everywhere equals the definition done one
    # scalar multiply-add at a time.
    x, w = _operands(case, rng, random_array, "float64")
    ref = conv_transpose_ref(x, w, **case.kwargs)
    loops = conv_transpose_loops(x, w, **case.kwargs)
    assert ref.shape == case.output_shape
    np.testing.assert_allclose(ref, loops, rtol=1e-13, atol=1e-13)


def test_reference_grid_is_not_trivial():
    # Enough cases really exercise the loops check, and the planner offers several kernels.
    assert len(TINY) >= 20
    assert {c.ndim for c in TINY} == {1, 2, 3}
    assert len(ALGORITHMS) >= 3 and "direct" in ALGORITHMS


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_unit_kernel_with_identity_weight_zero_stuffs(ndim, stride, rng):
    # k = 1 with an identity weight: the output is the input spread `stride` apart, zeros
    # in between: derived from the definition by hand, not from running any code.
    x = rng.standard_normal((2, *(3,) * ndim, 4))
    w = np.eye(4).reshape(4, *(1,) * ndim, 4)
    expected = np.zeros((2, *(3 * stride - stride + 1,) * ndim, 4))
    expected[(slice(None), *(slice(None, None, stride),) * ndim)] = x
    np.testing.assert_array_equal(conv_transpose_ref(x, w, stride=stride), expected)
    np.testing.assert_array_equal(FUNCS[ndim](x, w, stride=stride), expected)


# ---- the public functions -------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_call_matches_reference(case, dtype, rng, random_array, assert_close):
    x, w = _operands(case, rng, random_array, dtype)
    out = FUNCS[case.ndim](x, w, **case.kwargs)
    assert out.dtype == np.dtype(dtype)
    assert out.shape == case.output_shape
    ref = conv_transpose_ref(x, w, **case.kwargs)
    if case.batch:
        assert np.abs(ref).max() > 0  # the comparison below is not 0 == 0
    assert_close(out, ref, dtype, magnitude_ref(x, w, **case.kwargs), what=case.id)


# ---- every algorithm the planner can pick ---------------------------------------------

ALGO_CASES = [(c, a) for c in CASES for a in _algorithms(c)]


@pytest.mark.parametrize("case,algorithm", ALGO_CASES,
                         ids=[f"{c.id}-{a}" for c, a in ALGO_CASES])
def test_algorithm_matches_reference(case, algorithm, rng, random_array, assert_close):
    x, w = _operands(case, rng, random_array)
    p = ct.plan(case.input_shape, case.weight_shape, **case.kwargs, dtype=np.float32,
                algorithm=algorithm)
    assert p.algorithm == algorithm
    assert p.spec.output_shape == case.output_shape
    out = ct.run_plan(p, x, w)
    assert out.dtype == np.float32 and out.shape == case.output_shape
    ref = conv_transpose_ref(x, w, **case.kwargs)
    assert_close(out, ref, np.float32, magnitude_ref(x, w, **case.kwargs),
                 what=f"{case.id} {algorithm}")
    assert np.array_equal(ct.run_plan(p, x, w), out)  # the same bits on a second run


def test_every_algorithm_is_exercised():
    used = {a for _, a in ALGO_CASES}
    assert used == set(ALGORITHMS), (used, ALGORITHMS)


def test_direct_refused_with_several_channels_per_group():
    with pytest.raises(ValueError, match="direct"):
        ct.plan((1, 4, 4, 4), (4, 3, 3, 2), groups=2, algorithm="direct")


@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a != "direct"])
def test_run_plan_with_other_dtypes_than_planned(algorithm, rng, random_array, assert_close):
    case = next(c for c in (CASES[3], *WINOGRAD_CASES, *CASES) if algorithm in _algorithms(c))
    p = ct.plan(case.input_shape, case.weight_shape, **case.kwargs, algorithm=algorithm)
    x = random_array(rng, case.input_shape, np.float16)
    w = random_array(rng, case.weight_shape, ml_dtypes.bfloat16)
    out = ct.run_plan(p, x, w)
    assert out.dtype == np.float32  # float16 with bfloat16 meets at float32, as in MLX
    assert_close(out, conv_transpose_ref(x, w, **case.kwargs), np.float32,
                 magnitude_ref(x, w, **case.kwargs))


def test_run_plan_refuses_other_shapes(rng, random_array):
    p = ct.plan((1, 4, 4, 3), (5, 3, 3, 3), stride=2)
    x = random_array(rng, (1, 5, 4, 3), np.float32)
    w = random_array(rng, (5, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="plan is for input"):
        ct.run_plan(p, x, w)


# ---- tiling: tiny workspaces force many tiles ------------------------------------------

TILE_CASES = [
    Case("tiles-3d", 2, (4, 5, 6), 5, 6, (3, 3, 3), stride=2, padding=1, output_padding=1),
    Case("tiles-3d-aniso", 1, (5, 4, 6), 4, 3, (2, 3, 4), stride=(1, 2, 3),
         padding=(0, 1, -1), dilation=(2, 1, 1), output_padding=(1, 0, 2)),
    Case("tiles-3d-grouped", 2, (3, 5, 4), 6, 4, (3, 2, 3), stride=2, padding=1, groups=2),
    Case("tiles-3d-depthwise", 2, (4, 4, 5), 4, 8, (3, 3, 3), stride=2, padding=1, groups=4),
    Case("tiles-2d", 3, (7, 6), 4, 5, (4, 4), stride=2, padding=1),
    Case("tiles-2d-negpad", 2, (6, 7), 3, 4, (3, 3), stride=3, padding=-1, dilation=2,
         output_padding=4),
    Case("tiles-1d", 5, (40,), 3, 4, (3,), stride=2, padding=1, output_padding=1),
]
# 'indexed' is one task by design (small calls only): nothing to tile.
# 'native' needs far less workspace (none in float32), so its second budget is smaller.
# Kernels whose tasks take workspace, which a small budget cuts into tiles. (One that
# copies the whole input first, as `planar`, or holds every product, as `cols`, refuses a
# budget below that instead: tests/test_plan.py.)
TILE_RUNS = [(c, a, ws) for c in TILE_CASES for a in _algorithms(c) if a != "indexed"
             and not REGISTRY[a].input_copy_bytes and a != "cols"
             for ws in ((1, 512) if a == "native" else (1, 4096))]


@pytest.mark.parametrize("case,algorithm,workspace", TILE_RUNS,
                         ids=[f"{c.id}-{a}-ws{ws}" for c, a, ws in TILE_RUNS])
def test_small_workspace_matches_reference(case, algorithm, workspace, rng, random_array,
                                           assert_close):
    # 'native' reads and writes float32 in place, with no workspace to budget: in float16
    # it converts the input rows and rounds the output through its buffer, which the
    # budget then cuts into tiles.
    dtype = "float16" if algorithm == "native" else "float32"
    x, w = _operands(case, rng, random_array, dtype)
    p = ct.plan(case.input_shape, case.weight_shape, **case.kwargs, algorithm=algorithm,
                workspace=workspace, threads=1, dtype=dtype)
    # The test is only worth something if the budget really cut the work into tiles:
    # more tasks than phase groups.
    assert len(p.tasks) > len(p.phase_groups), (len(p.tasks), len(p.phase_groups))
    assert p.workspace_limit == workspace
    out = ct.run_plan(p, x, w)
    ref = conv_transpose_ref(x, w, **case.kwargs)
    assert_close(out, ref, np.dtype(dtype), magnitude_ref(x, w, **case.kwargs),
                 what=f"{case.id} {algorithm} workspace={workspace}")


# ---- threads: correct, and bitwise reproducible at a given thread count -----------------

# Big enough that the planner really hands the tiles to two workers (it keeps calls it
# estimates under a couple of milliseconds on one thread): many channels, few positions,
# so that the reference stays fast.
THREAD_CASES = [
    Case("threads-3d", 2, (6, 7, 8), 64, 64, (3, 3, 3), stride=2, padding=1,
         output_padding=1),
    Case("threads-3d-depthwise", 2, (8, 8, 8), 64, 128, (3, 3, 3), stride=2, padding=1,
         groups=64),
    Case("threads-2d-grouped", 2, (24, 20), 64, 64, (4, 4), stride=2, padding=1, groups=2),
]
THREAD_WORKSPACE = 1 << 16  # a small workspace gives every thread several tiles
THREAD_RUNS = [(c, a) for c in THREAD_CASES for a in _algorithms(c, THREAD_WORKSPACE)
               if a != "indexed"]


@pytest.mark.parametrize("case,algorithm", THREAD_RUNS,
                         ids=[f"{c.id}-{a}" for c, a in THREAD_RUNS])
def test_threads_are_correct_and_reproducible(case, algorithm, rng, random_array,
                                              assert_close):
    x, w = _operands(case, rng, random_array)
    ref = conv_transpose_ref(x, w, **case.kwargs)
    mag = magnitude_ref(x, w, **case.kwargs)
    for threads in (1, 2):
        # A small workspace gives every thread several tiles to take in any order.
        p = ct.plan(case.input_shape, case.weight_shape, **case.kwargs, algorithm=algorithm,
                    threads=threads, workspace=THREAD_WORKSPACE)
        # scatter runs its tiles in order on one worker: its short window adds contend
        # for the GIL, and two workers measured slower.
        workers = 1 if algorithm == "scatter" else threads
        assert p.threads == workers and len(p.tasks) >= 2 * workers, (p.threads, len(p.tasks))
        first = ct.run_plan(p, x, w)
        assert_close(first, ref, np.float32, mag, what=f"{case.id} {algorithm} x{threads}")
        for _ in range(3):
            again = ct.run_plan(p, x, w)
            assert np.array_equal(first, again), f"{case.id} {algorithm}: threads={threads} " \
                "gave different bits from one run to the next"


def test_set_num_threads_changes_default_plan():
    big = ((2, 16, 16, 16, 64), (64, 3, 3, 3, 64))  # planned only, never computed
    try:
        ct.set_num_threads(1)
        assert ct.plan(*big, stride=2).threads == 1
        ct.set_num_threads(2)
        assert ct.plan(*big, stride=2).threads == 2
    finally:
        ct.set_num_threads(None)
    with pytest.raises(ValueError, match="'n'"):
        ct.set_num_threads(0)


def test_repeated_calls_follow_set_num_threads(monkeypatch):
    # A repeated call reuses its plan (the front door keeps recent ones by their shapes and
    # settings): a thread count set between two such calls must still reach the second.
    from convtranspose import _api
    seen = []
    real = _api.execute
    monkeypatch.setattr(_api, "execute", lambda p, x, w: (seen.append(p.threads), real(p, x, w))[1])
    x = np.ones((1, 8, 16, 16, 32), np.float32)
    w = np.ones((32, 3, 3, 3, 32), np.float32)
    try:
        ct.set_num_threads(2)
        first = ct.conv_transpose3d(x, w, stride=2, padding=1, output_padding=1)
        ct.conv_transpose3d(x, w, stride=2, padding=1, output_padding=1)
        ct.set_num_threads(1)
        last = ct.conv_transpose3d(x, w, stride=2, padding=1, output_padding=1)
    finally:
        ct.set_num_threads(None)
    assert seen == [2, 2, 1]
    assert np.array_equal(first, last)


def test_repeated_calls_read_the_weight_afresh():
    # Plans are reused between calls, never the weight's values.
    x = np.arange(64 * 8, dtype=np.float32).reshape(1, 4, 4, 4, 8) / 100
    w = np.ones((8, 3, 3, 3, 8), np.float32)
    first = ct.conv_transpose3d(x, w, stride=2, padding=1, output_padding=1)
    w *= 2
    second = ct.conv_transpose3d(x, w, stride=2, padding=1, output_padding=1)
    np.testing.assert_array_equal(second, 2 * first)


def test_planner_default_choice_is_one_of_the_tested_algorithms():
    for case in CASES + TILE_CASES + THREAD_CASES:
        p = ct.plan(case.input_shape, case.weight_shape, **case.kwargs)
        assert p.algorithm in _algorithms(case), case.id
