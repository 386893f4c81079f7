"""convtranspose.dask: lazy results equal to the in-memory call, over uneven chunks and every
setting, on the threaded scheduler and on a real distributed cluster; the graph is local
(each output chunk reads only the input chunks its halo touches); and the shared slab
arithmetic in `_slabs` on its own."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import pytest
from dask.core import get_dependencies
from distributed import Client, LocalCluster, get_task_stream
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import conv_transpose_ref, magnitude_ref

import convtranspose as ct
import convtranspose.dask as ctd
from convtranspose import _slabs
from convtranspose._spec import make_spec, memory_limit_bytes, output_size

FUNCS = {1: ct.conv_transpose1d, 2: ct.conv_transpose2d, 3: ct.conv_transpose3d}
DFUNCS = {1: ctd.conv_transpose1d, 2: ctd.conv_transpose2d, 3: ctd.conv_transpose3d}


@dataclass(frozen=True)
class DCase:
    """A call on a chunked input: chunks per axis (batch, *spatial, channels)."""

    name: str
    chunks: tuple
    c_out: int
    kernel: tuple[int, ...]
    stride: int | tuple[int, ...] = 1
    padding: int | tuple[int, ...] = 0
    dilation: int | tuple[int, ...] = 1
    output_padding: int | tuple[int, ...] = 0
    groups: int = 1
    dtype: str = "float32"
    wdtype: str = "float32"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(sum(c) for c in self.chunks)

    @property
    def ndim(self) -> int:
        return len(self.chunks) - 2

    @property
    def kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    output_padding=self.output_padding, groups=self.groups)


CASES = [
    DCase("3d-mixed-settings-groups", ((1, 1), (3, 4, 2), (5, 2), (4, 4, 3), (6,)), 4,
          (3, 2, 3), stride=(2, 1, 3), padding=(1, -1, 2), dilation=(1, 2, 1),
          output_padding=(1, 3, 0), groups=2),
    DCase("3d-unet-k2s2", ((2,), (3, 5), (4, 1, 3), (8,), (8,)), 4, (2, 2, 2), stride=2),
    DCase("3d-gan-k4s2p1-size1-chunks", ((1,), (1, 1, 3, 1), (2, 2, 2), (6,), (4,)), 3,
          (4, 4, 4), stride=2, padding=1),
    DCase("3d-depthwise-channels-split", ((1,), (4, 3), (3, 4), (5, 2), (2, 2, 2)), 6,
          (3, 3, 3), stride=2, padding=1, output_padding=1, groups=6),
    DCase("3d-negative-output-padding", ((1,), (3, 3), (2, 2), (4,), (3,)), 2, (3, 3, 3),
          stride=2, output_padding=-1),
    DCase("3d-negative-padding-big-dilation", ((1,), (2, 3), (3, 1), (2, 2), (2,)), 2,
          (2, 3, 2), stride=(1, 2, 3), padding=-2, dilation=(3, 2, 4)),
    DCase("3d-output-padding-beyond-stride", ((2,), (2, 2), (3,), (1, 2), (3,)), 3,
          (2, 2, 2), stride=2, padding=(0, 2, 1), output_padding=(5, 4, 3)),
    DCase("3d-float16-x-float32-weight", ((1,), (3, 2), (2, 3), (4,), (4,)), 4, (3, 3, 3),
          stride=2, padding=1, dtype="float16"),
    DCase("3d-float64", ((1,), (2, 3), (3,), (2, 2), (2,)), 2, (2, 3, 2), stride=(2, 1, 2),
          padding=(0, 1, 0), dtype="float64", wdtype="float64"),
    DCase("2d-uneven-groups", ((1, 2), (5, 1, 4), (3, 3, 2), (4,)), 6, (3, 4), stride=(3, 2),
          padding=(2, 1), dilation=(2, 1), output_padding=(2, 0), groups=2),
    DCase("1d-uneven", ((2,), (1, 4, 2, 3), (3,)), 5, (5,), stride=3, padding=2,
          dilation=2, output_padding=4),
    DCase("1d-stride1-kernel1", ((1,), (3, 3, 1), (2,)), 2, (1,), padding=-1),
]


def _data(case: DCase, rng) -> tuple[da.Array, np.ndarray, np.ndarray]:
    x_np = rng.uniform(-1, 1, case.shape).astype(case.dtype)
    c_in = case.shape[-1]
    w = rng.uniform(-1, 1, (case.c_out, *case.kernel, c_in // case.groups)).astype(case.wdtype)
    return da.from_array(x_np, chunks=case.chunks), x_np, w


def _expected(case: DCase, x_np: np.ndarray, w: np.ndarray) -> np.ndarray:
    return FUNCS[case.ndim](x_np, w, **case.kwargs)


def _result_dtype(case: DCase) -> str:
    w_shape = (case.c_out, *case.kernel, case.shape[-1] // case.groups)
    return make_spec("t", case.ndim, case.shape, w_shape, case.stride, case.padding,
                     case.dilation, case.output_padding, case.groups, case.dtype,
                     case.wdtype).result_dtype.name


def _check_local(y: da.Array, x: da.Array, ndim: int) -> None:
    """No task reads more than the input chunks of one halo: a global rechunk (one task
    reading every chunk) or anything materialising the input would break this."""
    graph = dict(y.__dask_graph__())
    n_in_chunks = math.prod(len(c) for c in x.chunks[1:-1])
    # Spatial pieces per axis <= 2 in these cases (halo < chunk), times split channels.
    bound = 3 ** ndim * len(x.chunks[-1]) + 1
    worst = max(len(get_dependencies(graph, k)) for k in graph)
    assert worst <= bound, (worst, bound)
    if n_in_chunks > bound:
        assert worst < n_in_chunks


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_threaded_equals_in_memory(case, rng, assert_close):
    x, x_np, w = _data(case, rng)
    y = DFUNCS[case.ndim](x, w, **case.kwargs)
    expected = _expected(case, x_np, w)
    assert y.shape == expected.shape and y.dtype == expected.dtype
    assert y.dtype.name == _result_dtype(case)
    # Chunks follow the input: one output chunk per batch chunk, channels whole.
    assert y.chunks[0] == x.chunks[0] and y.chunks[-1] == (case.c_out,)
    got = y.compute(scheduler="threads")
    assert got.dtype == expected.dtype
    assert_close(got, expected, got.dtype, what=case.name)
    _check_local(y, x, case.ndim)


@pytest.mark.parametrize("case", [c for c in CASES if c.name.startswith(
    ("3d-mixed", "3d-gan", "3d-negative-padding", "2d-", "1d-uneven"))], ids=lambda c: c.name)
def test_matches_definition(case, rng, assert_close):
    """Independent of the in-memory engine: the definition, in float64."""
    x, x_np, w = _data(case, rng)
    got = DFUNCS[case.ndim](x, w, **case.kwargs).compute(scheduler="threads")
    assert_close(got, conv_transpose_ref(x_np, w, **case.kwargs), got.dtype,
                 magnitude_ref(x_np, w, **case.kwargs), what=case.name)


def test_output_chunks_follow_input_chunks():
    x = da.zeros((1, 10, 7, 4), chunks=(1, (3, 3, 4), (2, 5), 4), dtype=np.float32)
    w = np.zeros((2, 4, 3, 4), np.float32)
    y = ctd.conv_transpose2d(x, w, stride=2, padding=1, output_padding=(1, 0))
    # Boundary b -> 2b - 1; the last chunk takes the rest (output_padding included).
    assert y.shape == (1, 21, 13, 2)
    assert y.chunks[1] == (5, 6, 10) and y.chunks[2] == (3, 10)
    # Each output chunk reads its own input chunk plus a halo of floor(1*(4-1)/2) = 1.
    graph = dict(y.__dask_graph__())
    for key in itertools.product([y.name], range(1), range(3), range(2), range(1)):
        deps = {d for d in get_dependencies(graph, key) if isinstance(d, tuple)}
        assert len(deps) <= 4
        rows = {d[2] for d in deps}
        assert rows <= {key[2] - 1, key[2]}


def test_no_global_rechunk_and_nothing_materialised():
    calls = []

    def make(block):
        if block.size:  # map_blocks probes with an empty block to learn the dtype
            calls.append(1)
        return np.ones(block.shape, np.float32)

    x = da.zeros((2, 12, 12, 12, 8), chunks=(1, 4, 4, 4, 8), dtype=np.float32)
    x = x.map_blocks(make, dtype=np.float32)
    w = np.ones((4, 3, 3, 3, 8), np.float32)
    y = ctd.conv_transpose3d(x, w, stride=2, padding=1)
    assert calls == []  # building the graph computed nothing
    layers = list(y.__dask_graph__().layers)
    assert not any("rechunk" in name for name in layers), layers
    _check_local(y, x, 3)
    # 54 input chunks; each output chunk depends on at most 2 per axis, plus the weight.
    graph = dict(y.__dask_graph__())
    ours = [k for k in graph if isinstance(k, tuple) and k[0] == y.name]
    assert len(ours) == 2 * 3 * 3 * 3
    assert max(len(get_dependencies(graph, k)) for k in ours) <= 8 + 1
    # Computing reads each input chunk exactly once (the sync scheduler shares results).
    y.compute(scheduler="sync")
    assert len(calls) == 2 * 3 * 3 * 3

    # A split channel axis is rechunked along that axis only: spatial chunks survive.
    xs = da.zeros((1, 12, 12, 12, 8), chunks=(1, 4, 4, 4, 3), dtype=np.float32)
    ys = ctd.conv_transpose3d(xs, w, stride=2, padding=1)
    assert ys.chunks[1:-1] == y.chunks[1:-1]
    _check_local(ys, xs, 3)


def test_graph_is_deterministic():
    x = da.ones((1, 6, 5, 2), chunks=(1, 3, 2, 2), dtype=np.float32)
    w = np.ones((3, 2, 2, 2), np.float32)
    a = ctd.conv_transpose2d(x, w, stride=2)
    b = ctd.conv_transpose2d(x, w.copy(), stride=2)
    c = ctd.conv_transpose2d(x, w, stride=2, padding=1)
    assert a.name == b.name != c.name


def test_weight_may_be_a_dask_array(rng, assert_close):
    x_np = rng.uniform(-1, 1, (1, 5, 6, 3)).astype(np.float32)
    w = rng.uniform(-1, 1, (2, 3, 3, 3)).astype(np.float32)
    got = ctd.conv_transpose2d(da.from_array(x_np, chunks=(1, 2, 3, 3)),
                               da.from_array(w, chunks=1), stride=2).compute()
    assert_close(got, ct.conv_transpose2d(x_np, w, stride=2), np.float32)


def test_output_larger_than_memory_stays_lazy(rng, assert_close):
    """An output the in-memory call refuses (bigger than this machine) is fine lazily, and
    one corner of it computes from a corner of the input."""
    shape = (1, 4096, 4096, 8, 4)
    w = rng.uniform(-1, 1, (16, 2, 2, 2, 4)).astype(np.float32)
    out_bytes = 1 * 8192 * 8192 * 16 * 16 * 4
    assert out_bytes > memory_limit_bytes()
    with pytest.raises(ValueError, match="memory"):
        ct.output_shape(shape, w.shape, stride=2)
    x = da.random.default_rng(0).random(shape, chunks=(1, 64, 64, 8, 4), dtype=np.float32)
    y = ctd.conv_transpose3d(x, w, stride=2)
    assert y.shape == (1, 8192, 8192, 16, 16)
    corner = y[:, :6, :5, :, :].compute(scheduler="threads")
    x_corner = x[:, :3, :3].compute()
    assert_close(corner, ct.conv_transpose3d(x_corner, w, stride=2)[:, :6, :5], np.float32)


@pytest.mark.parametrize("bad, exc, match", [
    (lambda x, w: ctd.conv_transpose3d(np.zeros((1, 2, 2, 2, 3), np.float32), w),
     TypeError, "dask.array.Array"),
    (lambda x, w: ctd.conv_transpose3d(x.astype(np.int32), w), TypeError, "floating dtype"),
    (lambda x, w: ctd.conv_transpose3d(x, w[..., :2]), ValueError, "channel mismatch"),
    (lambda x, w: ctd.conv_transpose3d(x, w, stride=0), ValueError, "'stride' must be >= 1"),
    (lambda x, w: ctd.conv_transpose3d(x, w, padding=(1, 2)), ValueError, "3 ints"),
    (lambda x, w: ctd.conv_transpose2d(x, w), ValueError, "4 dimensions"),
    (lambda x, w: ctd.conv_transpose3d(x, w, padding=5), ValueError, "spatial size"),
    (lambda x, w: ctd.conv_transpose3d(x[x[:, 0, 0, 0, 0] > 0], w), ValueError,
     "unknown chunk sizes"),
])
def test_bad_calls_raise_clear_errors(bad, exc, match):
    x = da.ones((2, 4, 4, 4, 3), chunks=2, dtype=np.float32)
    w = np.ones((2, 3, 3, 3, 3), np.float32)
    with pytest.raises(exc, match=match) as info:
        bad(x, w)
    assert "conv_transpose" in str(info.value)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_property_random_chunks_and_settings(data):
    ndim = data.draw(st.integers(1, 3), label="ndim")
    groups = data.draw(st.sampled_from([1, 2]), label="groups")
    c_in = groups * data.draw(st.integers(1, 2))
    c_out = groups * data.draw(st.integers(1, 2))
    sizes, kernel, chunks, stride, padding, dilation, out_pad = [], [], [], [], [], [], []
    for _ in range(ndim):
        n = data.draw(st.integers(1, 7))
        k = data.draw(st.integers(1, 4))
        s = data.draw(st.integers(1, 3))
        d = data.draw(st.integers(1, 2))
        p = data.draw(st.integers(-2, 3))
        base = (n - 1) * s - 2 * p + d * (k - 1) + 1
        lowest = max(-2, 1 - base)  # every output size >= 1
        op = data.draw(st.integers(lowest, lowest + 6))
        cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=3))) if n > 1 else []
        bounds = [0, *cuts, n]
        chunks.append(tuple(b - a for a, b in zip(bounds, bounds[1:])))
        for lst, v in zip((sizes, kernel, stride, padding, dilation, out_pad),
                          (n, k, s, p, d, op)):
            lst.append(v)
    batch = data.draw(st.integers(1, 2))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    x_np = rng.uniform(-1, 1, (batch, *sizes, c_in)).astype(np.float32)
    w = rng.uniform(-1, 1, (c_out, *kernel, c_in // groups)).astype(np.float32)
    x = da.from_array(x_np, chunks=((1,) * batch, *chunks, (c_in,)))
    kw = dict(stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
              output_padding=tuple(out_pad), groups=groups)
    got = DFUNCS[ndim](x, w, **kw).compute(scheduler="sync")
    expected = conv_transpose_ref(x_np, w, **kw)
    bound = 1e-5 * (np.abs(expected) + magnitude_ref(x_np, w, **kw)) + 1e-30
    assert got.shape == expected.shape
    assert np.all(np.abs(got - expected) <= bound)


# ---- a real distributed cluster: 2 worker processes on loopback -------------------------

@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


@pytest.mark.parametrize("case", [c for c in CASES if not c.name.startswith("3d-float")],
                         ids=lambda c: c.name)
def test_distributed_equals_in_memory(case, rng, client, assert_close):
    x, x_np, w = _data(case, rng)
    y = DFUNCS[case.ndim](x, w, **case.kwargs)
    with get_task_stream(client) as stream:
        got = client.compute(y).result()
    ran = {t["key"][0] if isinstance(t["key"], tuple) else t["key"] for t in stream.data}
    assert y.name in ran  # the blocks really ran on the workers
    assert_close(got, _expected(case, x_np, w), got.dtype, what=case.name)


def test_distributed_has_two_worker_processes(client):
    pids = client.run(lambda: __import__("os").getpid())
    assert len(set(pids.values())) == 2
    assert all(addr.startswith("tcp://127.0.0.1:") for addr in pids)


def test_distributed_larger_volume(rng, client, assert_close):
    x_np = rng.uniform(-1, 1, (2, 20, 18, 16, 8)).astype(np.float32)
    w = rng.uniform(-1, 1, (8, 4, 4, 4, 8)).astype(np.float32)
    x = da.from_array(x_np, chunks=(1, (7, 7, 6), (9, 9), 16, 8))
    y = ctd.conv_transpose3d(x, w, stride=2, padding=1)
    got = client.compute(y).result()
    assert_close(got, ct.conv_transpose3d(x_np, w, stride=2, padding=1), np.float32)
    with dask.config.set(scheduler="threads"):
        assert_close(y.compute(), got, np.float32)


# ---- the slab arithmetic shared with `convtranspose apply` -------------------------------

def test_slab_blocks_cover_and_reproduce_every_setting(rng):
    """Along one axis, every block of any boundaries equals the same crop of the whole
    result, and its input range holds every input position that reaches it."""
    checked = 0
    for n, k, s, d, p, op in itertools.product((1, 2, 5), (1, 2, 3), (1, 2, 3), (1, 2),
                                               (-2, 0, 1, 3), (-1, 0, 2, 4)):
        out = output_size(n, k, s, p, d, op)
        if out < 1:
            continue
        x = rng.uniform(-1, 1, (1, n, 2)).astype(np.float32)
        w = rng.uniform(-1, 1, (3, k, 2)).astype(np.float32)
        whole = ct.conv_transpose1d(x, w, s, p, d, op)
        spec = make_spec("t", 1, x.shape, w.shape, s, p, d, op, 1, x.dtype, w.dtype)
        cuts = sorted(rng.choice(np.arange(1, out), size=min(3, out - 1), replace=False)) \
            if out > 1 else []
        bounds = [0, *map(int, cuts), out]
        for b in _slabs.spec_blocks(spec, [bounds])[0]:
            reach = {i for i in range(n) for t in range(k)
                     if b.out_start <= i * s + t * d - p < b.out_stop}
            assert reach <= set(range(b.in_start, b.in_stop))
            assert b.empty == (not reach) or not reach
            got = _slabs.compute_block(spec, x[:, b.in_start:b.in_stop], w, [b])
            np.testing.assert_allclose(got, whole[:, b.out_start:b.out_stop], atol=1e-5)
            checked += 1
    assert checked > 500


def test_slab_crops_go_through_the_spec_not_the_public_arguments(rng, monkeypatch):
    """A block's crops (negative, or past the stride) are the slab arithmetic's own: no
    rule of the public padding/output_padding arguments is asked about them."""
    x = rng.uniform(-1, 1, (1, 7, 3)).astype(np.float32)
    w = rng.uniform(-1, 1, (2, 3, 3)).astype(np.float32)
    whole = ct.conv_transpose1d(x, w, 2, -2, 1, 3)
    spec = make_spec("t", 1, x.shape, w.shape, 2, -2, 1, 3, 1, x.dtype, w.dtype)
    blocks = _slabs.spec_blocks(spec, [[0, 5, 11, spec.out_spatial[-1]]])[0]
    assert any(b.pad_lo < 0 or b.pad_hi < 0 for b in blocks)

    def refused(*args, **kwargs):
        raise AssertionError("a slab went through the public arguments")

    monkeypatch.setattr("convtranspose._spec.make_spec", refused)
    monkeypatch.setattr("convtranspose._spec.normalize_padding", refused)
    monkeypatch.setattr("convtranspose._api._conv_transpose", refused)
    for b in blocks:
        got = _slabs.compute_block(spec, x[:, b.in_start:b.in_stop], w, [b])
        np.testing.assert_allclose(got, whole[:, b.out_start:b.out_stop], atol=1e-5)


def test_output_bounds_from_input():
    assert _slabs.output_bounds_from_input([3, 3, 4], 2, 1, 21) == [0, 5, 11, 21]
    assert _slabs.output_bounds_from_input([4], 2, 0, 8) == [0, 8]
    # Negative padding pushes boundaries up; clipping drops blocks that become empty.
    assert _slabs.output_bounds_from_input([1, 1, 1, 1], 1, -3, 5) == [0, 4, 5]
    assert _slabs.output_bounds_from_input([2, 0, 2], 1, 0, 4) == [0, 2, 4]


def test_outputs_larger_than_memory_are_specified_for_dask_but_refused_in_memory():
    shape = (1, 4096, 4096, 8, 4)
    w_shape = (16, 2, 2, 2, 4)
    spec = make_spec("t", 3, shape, w_shape, 2)  # what convtranspose.dask validates with
    assert spec.input_shape == shape and spec.output_shape == (1, 8192, 8192, 16, 16)
    with pytest.raises(ValueError, match="channel mismatch"):
        make_spec("t", 3, shape, (16, 2, 2, 2, 3), 2)
    with pytest.raises(ValueError, match="GiB"):
        ct.output_shape(shape, w_shape, 2)


def test_import_convtranspose_never_imports_dask_or_zarr():
    code = ("import sys, convtranspose, convtranspose._slabs, convtranspose._apply, "
            "convtranspose._cli\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('dask', 'distributed', 'zarr'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_module_docstring_example_runs():
    import doctest

    result = doctest.testmod(ctd, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_an_interrupted_block_leaves_no_array_in_garbage_frames(monkeypatch):
    """Ctrl-C inside a block: Dask's threaded scheduler keeps the KeyboardInterrupt with
    its traceback in a reference cycle, whose frames held the block's arrays until the
    cyclic collector ran (a whole output of memory after an interrupted compute). The
    block's frames leave cleared: the array is gone with the collector off."""
    import gc
    import weakref

    import convtranspose.dask as ctd_module
    held = []

    def interrupted(spec, slab, weight, blocks, bias):
        out = np.ones((64, 64), np.float32)  # what the engine would be filling
        held.append(weakref.ref(out))
        raise KeyboardInterrupt

    monkeypatch.setattr(ctd_module, "compute_block", interrupted)
    x = da.from_array(np.ones((1, 4, 4, 4, 2), np.float32), chunks=(1, 4, 4, 4, 2))
    y = ctd.conv_transpose3d(x, np.ones((2, 2, 2, 2, 2), np.float32), stride=2)
    gc.disable()
    try:
        with pytest.raises(KeyboardInterrupt):
            y.compute(scheduler="threads")
        assert held and all(ref() is None for ref in held)
    finally:
        gc.enable()
