"""The command line: `convtranspose --help`, `demo`, `bench`, and the bench's building blocks
(workload data, table/Markdown helpers, layout conversions, the ONNX model, the peers)."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import onnxruntime
import pytest
import torch

import convtranspose
from convtranspose import _bench, _demo
from convtranspose._bench import BenchRow, PeerTiming
from convtranspose._workloads import (
    WORKLOADS,
    make_arrays,
    make_cotangent,
    resolve_dtype,
    select_workloads,
    workload,
)


def run_cli(*args: str, cwd=None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convtranspose", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ the commands themselves


def test_help_lists_subcommands():
    res = run_cli("--help")
    assert res.returncode == 0, res.stderr
    for name in ("demo", "bench", "apply"):
        assert name in res.stdout
    res = run_cli("bench", "--help")
    assert res.returncode == 0, res.stderr
    for flag in ("--workload", "--dtype", "--rounds", "--threads", "--mlx", "--grad", "--out"):
        assert flag in res.stdout


def test_demo_runs_and_writes_png(tmp_path):
    out = tmp_path / "demo-out"
    res = run_cli("demo", "--out", str(out), "--repeat", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    text = res.stdout
    for layer in _demo.DECODER:
        assert f"\n{layer.name} " in text
        assert layer.describe in text
    assert "1x8x8x8x4" in text and "1x64x64x64x1" in text
    total = [line for line in text.splitlines() if line.startswith("total")]
    assert len(total) == 1
    assert "PyTorch agrees" in text  # torch is installed in CI: its comparison really ran
    isa = convtranspose.native_isa()
    assert (f"\nkernel: compiled ({isa})\n" if isa else "\nkernel: NumPy/BLAS fallback") in text
    png = out / "demo.png"
    assert png.is_file()
    import matplotlib.image as mpimg
    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
    assert float(img[..., :3].std()) > 0.05  # a picture, not a blank canvas


def test_bench_w9_prints_table_with_peers(tmp_path):
    res = run_cli("bench", "--workload", "W9", "--rounds", "2", "--sgemm-size", "512",
                  "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    header = next(line for line in lines if line.startswith("workload"))
    for col in ("ours ms", "GFLOP/s", "% peak", "PyTorch ms", "x torch", "ONNX Runtime ms",
                "x ort", "x best(torch/ort)", "workspace MiB"):
        assert col in header
    row = next(line for line in lines if line.startswith("W9 tiny"))
    # Our time, and numeric times and ratios for both peers (no n/a, no MISMATCH).
    assert "n/a" not in row and "MISMATCH" not in row
    ours_ms = float(row.split()[2])
    assert ours_ms > 0
    assert any(line.startswith("geomean") for line in lines)
    assert "sgemm (numpy float32 matmul 512^3" in res.stdout
    assert "peak used for % peak" in res.stdout
    kernel = convtranspose.native_isa()
    assert f"kernel: compiled, {kernel}" in res.stdout if kernel else \
        "kernel: none: NumPy fallback" in res.stdout
    assert "% peak = useful GFLOP/s as a share of" in res.stdout  # what the percentage is
    assert "random order each round" in res.stdout
    md = (tmp_path / "b" / "bench.md").read_text()
    assert "| W9 tiny |" in md and "| geomean |" in md
    assert "sgemm peak (numpy float32 512^3" in md and "PyTorch 2." in md
    assert (tmp_path / "b" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_unknown_workload():
    res = run_cli("bench", "--workload", "W1,W42")
    assert res.returncode == 2
    assert "W42" in res.stderr and "W1, W2" in res.stderr


def test_bench_grad_without_or_with_vjp():
    res = run_cli("bench", "--grad", "--workload", "W9", "--rounds", "1", "--sgemm-size", "256")
    if hasattr(convtranspose, "conv_transpose3d_vjp"):
        assert res.returncode == 0, res.stdout + res.stderr
        assert "W9 tiny" in res.stdout and "gradients" in res.stdout
        # ONNX Runtime has no gradients: not a column of n/a, not a peer at all.
        assert "ONNX" not in res.stdout and "x best(torch)" in res.stdout
    else:
        assert res.returncode == 1
        assert "grads are unavailable" in res.stderr


def test_missing_peer_is_reported_not_fatal(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    args = argparse.Namespace(workload="W9", dtype="float32", rounds=1, threads=1, mlx=False,
                              grad=False, out=None, sgemm_size=128)
    torch_threads = torch.get_num_threads()
    try:
        assert _bench.run(args) == 0
    finally:
        convtranspose.set_num_threads(None)
        torch.set_num_threads(torch_threads)
    text = capsys.readouterr().out
    assert "missing peers (not timed): ONNX Runtime" in text
    header = next(line for line in text.splitlines() if line.startswith("workload"))
    assert "PyTorch ms" in header and "ONNX Runtime ms" not in header


# ------------------------------------------------------------------ table and markdown


def _rows():
    return [
        BenchRow("W1 a", flops=4_000_000_000, ours_ms=20.0, workspace_bytes=8 * 2**20,
                 peers={_bench.TORCH: PeerTiming(40.0, variant="cl"),
                        _bench.ORT: PeerTiming(30.0)}),
        BenchRow("W2 b", flops=1_000_000, ours_ms=0.5, workspace_bytes=None,
                 peers={_bench.TORCH: PeerTiming(0.25, variant="ncdhw"),
                        _bench.ORT: PeerTiming(note="n/a (float64)")}),
    ]


def test_gradient_tables_show_each_gradient_against_the_forward():
    """With our forward and single-gradient medians, the workspace column gives way to the
    forward's time and each gradient's time with its ratio to the forward's."""
    rows = _rows()
    rows[0].parts = {"forward": 10.0, "grad_input": 12.0, "grad_weight": 16.0}
    rows[1].parts = {"forward": 0.5, "grad_weight": 0.25}
    header, body = _bench.table_cells(rows, [_bench.TORCH], peak_gflops=400.0)
    assert header[-4:] == ["x best(torch/ort)", "forward ms", "grad_input ms (x fwd)",
                           "grad_weight ms (x fwd)"]
    assert body[0][-3:] == ["10.0", "12.0 (1.20)", "16.0 (1.60)"]
    assert body[1][-3:] == ["0.500", "-", "0.250 (0.50)"]
    assert len(body[2]) == len(header)  # the geomean row spans the new columns too


def test_table_cells_from_given_timings():
    header, body = _bench.table_cells(_rows(), [_bench.TORCH, _bench.ORT], peak_gflops=400.0)
    assert header == ["workload", "ours ms", "GFLOP/s", "% peak", "PyTorch ms", "x torch",
                      "ONNX Runtime ms", "x ort", "x best(torch/ort)", "workspace MiB"]
    w1, w2, gm = body
    # 4 GFLOP in 20 ms = 200 GFLOP/s = 50% of 400.
    assert w1 == ["W1 a", "20.0", "200.0", "50%", "40.0 (cl)", "2.00", "30.0", "1.50",
                  "1.50", "8.0"]
    assert w2[:6] == ["W2 b", "0.500", "2.0", "0.5%", "0.250 (ncdhw)", "0.50"]
    assert w2[6:] == ["n/a (float64)", "n/a", "0.50", "-"]
    # geomeans: torch sqrt(2 * 0.5) = 1, ort only W1 = 1.5, best sqrt(1.5 * 0.5).
    assert gm[0] == "geomean" and gm[5] == "1.00" and gm[7] == "1.50"
    assert gm[8] == f"{math.sqrt(0.75):.2f}"


def test_mismatch_is_loud_and_not_counted():
    rows = _rows()
    rows[0].peers[_bench.ORT] = PeerTiming(10.0, mismatch=True, error=0.3)
    header, body = _bench.table_cells(rows, [_bench.TORCH, _bench.ORT], peak_gflops=None)
    assert body[0][7] == "MISMATCH"
    assert body[0][3] == "-"  # no peak measured, no percentage
    # The wrong (and faster) ORT result must not set the best ratio: torch's 2.00 does.
    assert body[0][8] == "2.00"
    assert body[-1][7] == "-"


def test_format_text_and_markdown():
    header, body = _bench.table_cells(_rows(), [_bench.TORCH, _bench.ORT], peak_gflops=400.0)
    text = _bench.format_text(header, body).splitlines()
    assert len(text) == 2 + len(body)
    assert set(text[1].replace(" ", "")) == {"-"}
    # Right-aligned numbers: every row's "ours ms" cell ends at the header's column end.
    end = text[0].index("ours ms") + len("ours ms")
    assert text[2][:end].endswith("20.0") and text[3][:end].endswith("0.500")
    md = _bench.format_markdown(header, body).splitlines()
    assert md[0].startswith("| workload | ours ms |")
    assert md[1].count("|") == len(header) + 1 and md[1].startswith("|:---|---:")
    assert all(line.count("|") == len(header) + 1 for line in md)
    assert md[2].startswith("| W1 a | 20.0 | 200.0 | 50% |")
    report = _bench.markdown_report(header, body, ["machine X"], ["a note"])
    assert report.startswith("# convtranspose bench") and "- machine X" in report
    assert "- a note" in report and "| geomean |" in report


def test_write_chart(tmp_path):
    path = tmp_path / "c.png"
    assert _bench.write_chart(_rows(), [_bench.TORCH, _bench.ORT], str(path), 400.0)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_no_matplotlib_means_no_picture_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not _bench.write_chart(_rows(), [_bench.TORCH], str(tmp_path / "c.png"))
    vol = _demo.synthetic_volume(0)
    assert not _demo.write_slices(vol, vol[..., :1], str(tmp_path / "d.png"))
    assert not any(tmp_path.iterdir())


def test_settle_waits_for_spinning_threads_to_park():
    """A peer's pool that spins after its call must not steal the next sample's cores:
    settle() returns only once this process is idle (here: a thread spins 0.15 s)."""
    import threading
    import time

    from convtranspose import _bench

    assert 0.06 <= _bench.settle() < 0.15  # idle already: the minimum pause, one look
    stop = time.perf_counter() + 0.15

    def spin():
        while time.perf_counter() < stop:
            pass

    worker = threading.Thread(target=spin)
    worker.start()
    waited = _bench.settle(min_pause=0.0)
    worker.join()
    assert waited >= 0.1


def test_round_order_is_random_each_round_and_runs_the_slow_last():
    """The fast runners come in a new random order every round (reproducible from the
    generator's seed); a slow one (MLX) is always last, so no fast runner follows it."""
    import random

    names = ["ours", "torch", "mlx", "ort"]
    slow = [False, False, True, False]
    rng = random.Random(3)
    orders = [_bench.round_order(names, slow, rng) for r in range(12)]
    assert all(o[-1] == "mlx" and sorted(o) == sorted(names) for o in orders)
    assert {o[0] for o in orders} == {"ours", "torch", "ort"}
    assert len({tuple(o) for o in orders}) > 2
    rng = random.Random(3)
    assert [_bench.round_order(names, slow, rng) for r in range(12)] == orders
    assert names == ["ours", "torch", "mlx", "ort"]  # the caller's list is left alone


def test_bursts_and_spread():
    assert _bench.burst_size(0.05) == 400  # 400 calls of 0.05 ms: a 20 ms burst
    assert _bench.burst_size(7.0) == 3     # at least SAMPLE_MS, never less
    assert _bench.burst_size(50.0) == 1 and _bench.burst_size(math.inf) == 1
    assert _bench.burst_size(1e-6) == 1000
    assert _bench.spread([10.0]) is None
    assert _bench.spread([10.0, 10.0, 10.0]) == 0.0
    # Inclusive quartiles of 8, 10, 10, 12: 9.5 and 10.5, median 10 -> 0.1.
    assert _bench.spread([12.0, 10.0, 8.0, 10.0]) == pytest.approx(0.1)


def test_bursts_are_sized_from_warm_calls():
    # A first call that pays for planning must not size the bursts: after it, calls go
    # on for SAMPLE_MS and the fastest sets the burst (a burst of 1-2 calls sized from a
    # 25 ms first call would be mostly that cold call).
    calls = []

    def call():
        time.sleep(0.025 if not calls else 0.001)
        calls.append(1)

    est = _bench.warm_up(call, 1)
    assert 1.0 <= est < 10.0 and len(calls) >= 3
    assert _bench.burst_size(est) >= 2
    calls.clear()
    assert _bench.warm_up(lambda: calls.append(1), 3) < 1.0 and len(calls) >= 4


def test_time_runners_times_every_runner_each_round():
    calls = []

    def runner(name):
        return _bench.Runner(lambda: calls.append(name), lambda r: r)

    samples = _bench.time_runners([("a", runner("a")), ("b", runner("b"))], "a", rounds=3)
    assert set(samples) == {"a", "b"} and all(len(v) == 3 for v in samples.values())
    assert all(t >= 0 for v in samples.values() for t in v)
    assert calls.count("a") == calls.count("b") > 3  # warm-up, then bursts of many calls


def test_a_spread_row_is_marked_unreliable_in_the_table():
    rows = _rows()
    rows[0].spread = {"ours": 0.02, "PyTorch (cl)": 0.4}
    rows[1].spread = {"ours": 0.02, "PyTorch (ncdhw)": 0.1}
    header, body = _bench.table_cells(rows, [_bench.TORCH, _bench.ORT], peak_gflops=400.0)
    best = header.index("x best(torch/ort)")
    assert body[0][best] == "1.50" + _bench.UNRELIABLE  # ORT 30 ms / ours 20 ms
    assert not body[1][best].endswith(_bench.UNRELIABLE)


def test_ratio_helpers():
    assert _bench.ratio(PeerTiming(30.0), 10.0) == pytest.approx(3.0)
    assert _bench.ratio(PeerTiming(None, note="n/a"), 10.0) is None
    assert _bench.ratio(None, 10.0) is None
    assert _bench.geomean([2.0, 8.0, None]) == pytest.approx(4.0)
    assert _bench.geomean([None]) is None


# ------------------------------------------------------------------ workloads


def test_workloads_match_the_library():
    assert list(WORKLOADS) == [f"W{i}" for i in range(1, 10)]
    for wl in WORKLOADS.values():
        out = convtranspose.output_shape(wl.input_shape, wl.weight_shape, **wl.settings)
        assert out == wl.output_shape
        p = convtranspose.plan(wl.input_shape, wl.weight_shape, **wl.settings)
        assert p.flops == wl.useful_flops
    w7 = WORKLOADS["W7"]
    assert w7.groups == 64 and w7.weight_shape == (64, 3, 3, 3, 1)
    assert WORKLOADS["W8"].output_shape == (1, 8, 64, 64, 64)
    assert WORKLOADS["W1"].useful_flops == 2 * 2 * 16**3 * 256 * 128 * 8


def test_select_workloads():
    assert [w.name for w in select_workloads("w3, W1,W3")] == ["W3", "W1"]
    assert len(select_workloads(None)) == len(select_workloads("all")) == 9
    with pytest.raises(ValueError, match="W0"):
        select_workloads("W0")
    with pytest.raises(ValueError, match="expected"):
        select_workloads(",")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_make_arrays_deterministic(dtype):
    wl = WORKLOADS["W9"]
    x1, w1 = make_arrays(wl, dtype, seed=3)
    x2, w2 = make_arrays(wl, dtype, seed=3)
    x3, _ = make_arrays(wl, dtype, seed=4)
    assert x1.dtype == w1.dtype == resolve_dtype(dtype)
    assert x1.shape == wl.input_shape and w1.shape == wl.weight_shape
    assert np.array_equal(x1, x2) and np.array_equal(w1, w2)
    assert not np.array_equal(x1, x3)
    y = convtranspose.conv_transpose3d(x1, w1, **wl.settings).astype(np.float32)
    assert np.isfinite(y).all() and 0.1 < float(np.abs(y).std()) < 10  # sanely scaled
    assert make_cotangent(wl, dtype).shape == wl.output_shape


def test_resolve_dtype_rejects_ints():
    with pytest.raises(ValueError, match="int32"):
        resolve_dtype("int32")


# ------------------------------------------------------------------ layouts and ONNX


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_torch_weight_layout(groups):
    rng = np.random.default_rng(0)
    c_out, cin_g = 2 * groups, 3
    w = rng.standard_normal((c_out, 2, 3, 1, cin_g)).astype(np.float32)
    wt = convtranspose.weight_to_torch(w, groups)
    cout_g = c_out // groups
    assert wt.shape == (groups * cin_g, cout_g, 2, 3, 1) and wt.flags.c_contiguous
    for g in range(groups):
        for i in range(cin_g):
            for o in range(cout_g):
                assert np.array_equal(wt[g * cin_g + i, o], w[g * cout_g + o, ..., i])
    assert np.array_equal(convtranspose.weight_from_torch(wt, groups), w)


ONNX_SETTINGS = [
    # (C_in, C_out, kernel, stride, padding, dilation, output_padding, groups)
    (4, 6, 3, 2, 1, 1, 1, 1),                      # output_padding
    (4, 4, 3, 1, 2, 1, 0, 1),                      # padding larger than the overlap
    (3, 5, 2, 2, 0, 2, 1, 1),                      # dilation, output_padding < dilation
    (6, 4, (3, 2, 3), (2, 1, 3), (1, 0, 2), (1, 2, 1), (1, 0, 2), 2),  # per axis, groups
    (4, 8, 3, 2, 1, 1, 0, 4),                      # depthwise with channel multiplier 2
]


@pytest.mark.parametrize("setting", ONNX_SETTINGS)
def test_onnx_model_equals_ours(setting):
    c_in, c_out, k, s, p, d, op, g = setting
    wl = workload("t", "onnx", 2, (3, 4, 5), c_in, c_out, k, s, p, op, groups=g, dilation=d)
    x, w = make_arrays(wl, np.float32, seed=7)
    ours = convtranspose.conv_transpose3d(x, w, **wl.settings)
    model = _bench.onnx_conv_transpose_model(
        (2, c_in, 3, 4, 5), convtranspose.weight_to_torch(w, g), wl.stride, wl.padding,
        wl.dilation, wl.output_padding, g)
    sess = _bench.onnx_session(model, threads=1)
    got = sess.run(None, {"X": _bench.to_channels_first(x)})[0]
    got = _bench.to_channels_last(got)
    assert got.shape == ours.shape
    np.testing.assert_allclose(got, ours, rtol=1e-4, atol=1e-5 * float(np.abs(ours).max()))
    assert _bench.relative_error(got, ours) < 1e-5


def test_relative_error_on_views():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((2, 3, 4, 5, 6)).astype(np.float32)
    view = _bench.to_channels_last(_bench.to_channels_first(ref))
    assert not view.flags.c_contiguous
    assert _bench.relative_error(view, ref) == 0.0
    bad = ref.copy()
    bad[1, 2, 3, 4, 5] += 0.5 * np.abs(ref).max()
    assert _bench.relative_error(bad, ref) == pytest.approx(0.5, rel=1e-6)
    assert _bench.relative_error(ref[:1], ref) == math.inf


# ------------------------------------------------------------------ peers against ours


def test_bench_workload_peers_agree_in_process():
    wl = WORKLOADS["W9"]
    logs = []
    row = _bench.bench_workload(wl, [_bench.TORCH, _bench.ORT, _bench.MLX], rounds=1,
                                threads=1, log=logs.append)
    assert row.ours_ms and row.ours_ms > 0 and row.workspace_bytes is not None
    for peer in (_bench.TORCH, _bench.ORT, _bench.MLX):
        t = row.peers[peer]
        assert t.ms and t.ms > 0, (peer, t)
        assert not t.mismatch and t.error is not None and t.error < 1e-5, (peer, t)
    assert row.peers[_bench.TORCH].variant in ("cl", "ncdhw")
    assert logs and "W9 tiny" in logs[0]
    convtranspose.set_num_threads(None)


def test_our_failure_is_reported_per_workload(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(convtranspose, "conv_transpose3d", broken)
    logs = []
    row = _bench.bench_workload(WORKLOADS["W9"], [_bench.TORCH], rounds=1, log=logs.append)
    assert row.ours_ms is None and "kernel exploded" in row.failure
    assert any("FAILED" in line for line in logs)
    header, body = _bench.table_cells([row], [_bench.TORCH], peak_gflops=100.0)
    assert body[0][1] == "FAILED" and body[-1][0] == "geomean"


def test_mlx_refuses_3d_groups_as_na():
    wl = workload("g", "groups", 1, 3, 4, 4, 2, 2, groups=2)
    x, w = make_arrays(wl)
    with pytest.raises(_bench.Unavailable, match="groups"):
        _bench.mlx_runners(wl, x, w, None)
    # ... and MLX itself really refuses it (the reason for the n/a).
    with pytest.raises(ValueError):
        mx.eval(mx.conv_transpose3d(mx.array(x), mx.array(w), stride=2, groups=2))


def test_ort_runner_verifies_against_ours_and_refuses_float64():
    wl = WORKLOADS["W9"]
    x, w = make_arrays(wl)
    (runner,) = _bench.ort_runners(wl, x, w, None, threads=1).values()
    got = runner.to_ours(runner.call())
    assert _bench.relative_error(got, convtranspose.conv_transpose3d(x, w, **wl.settings)) \
        < 1e-5
    x64, w64 = make_arrays(wl, np.float64)
    with pytest.raises(_bench.Unavailable, match="float64"):
        _bench.ort_runners(wl, x64, w64, None, threads=1)
    assert onnxruntime.get_device() == "CPU"


@pytest.mark.parametrize("peer", ["torch", "mlx"])
def test_peer_gradients_in_our_layout(peer):
    """The peers' gradients, converted to our layouts, satisfy <g, f(x, dw)> == <gw, dw> and
    <g, f(dx, w)> == <gx, dx> (the layer is linear in each argument), using our forward."""
    wl = workload("t", "grad", 1, (3, 4, 3), 4, 6, (2, 3, 3), 2, 1, 1,
                  groups=2 if peer == "torch" else 1)
    x, w = make_arrays(wl, np.float64 if peer == "torch" else np.float32, seed=5)
    g = make_cotangent(wl, x.dtype, seed=6)
    runners = (_bench.torch_runners(wl, x, w, g) if peer == "torch"
               else _bench.mlx_runners(wl, x, w, g))
    rng = np.random.default_rng(9)
    dx = rng.standard_normal(x.shape).astype(x.dtype)
    dw = rng.standard_normal(w.shape).astype(w.dtype)
    lhs_w = float(np.sum(g * convtranspose.conv_transpose3d(x, dw, **wl.settings)))
    lhs_x = float(np.sum(g * convtranspose.conv_transpose3d(dx, w, **wl.settings)))
    tol = 1e-9 if x.dtype == np.float64 else 1e-4
    for runner in runners.values():
        gx, gw = runner.to_ours(runner.call())
        assert gx.shape == x.shape and gw.shape == w.shape
        assert float(np.sum(gw * dw)) == pytest.approx(lhs_w, rel=tol, abs=tol)
        assert float(np.sum(gx * dx)) == pytest.approx(lhs_x, rel=tol, abs=tol)


# ------------------------------------------------------------------ demo pieces


@pytest.mark.parametrize("k,s", [(2, 2), (3, 1), (3, 2), (4, 2), (5, 3)])
def test_interpolation_taps_sum_to_one_per_phase(k, s):
    taps = _demo.interpolation_taps(k, s)
    assert taps.shape == (k,) and (taps > 0).all()
    for phase in range(min(k, s)):
        assert taps[phase::s].sum() == pytest.approx(1.0)


def test_demo_volume_and_weights_deterministic():
    v1, v2 = _demo.synthetic_volume(0), _demo.synthetic_volume(0)
    assert v1.shape == (1, 8, 8, 8, _demo.IN_CHANNELS) and v1.dtype == np.float32
    assert np.array_equal(v1, v2) and not np.array_equal(v1, _demo.synthetic_volume(1))
    ws = _demo.decoder_weights(0)
    shapes = [w.shape for w in ws]
    assert shapes == [(lay.c_out, lay.kernel, lay.kernel, lay.kernel, lay.c_in)
                      for lay in _demo.DECODER]
    out_shape = v1.shape
    for lay, w in zip(_demo.DECODER, ws):
        out_shape = convtranspose.output_shape(out_shape, w.shape, **lay.settings)
    assert out_shape == (1, 64, 64, 64, 1)


def test_demo_names_a_missing_kernel_and_its_cost(monkeypatch):
    monkeypatch.setattr(convtranspose, "native_isa", lambda: None)
    line = _demo.kernel_line()
    assert line.startswith("kernel: NumPy/BLAS fallback")
    assert "slower" in line and "C++ compiler" in line and "docs/PERFORMANCE.md" in line


def _block_matplotlib(monkeypatch):
    """As if matplotlib were not installed: importing it raises ImportError."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_demo_without_matplotlib_leaves_no_folder(monkeypatch, tmp_path, capsys):
    _block_matplotlib(monkeypatch)
    out = tmp_path / "convtranspose-demo"
    args = argparse.Namespace(out=str(out), seed=0, repeat=1, no_torch=True)
    assert _demo.run(args) == 0
    assert "matplotlib is not installed: no picture" in capsys.readouterr().out
    assert not out.exists()


def test_demo_colour_bars_are_labelled(monkeypatch, tmp_path):
    import matplotlib.figure
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *args, **kwargs: saved.append(fig))
    x = _demo.synthetic_volume(0)
    assert _demo.write_slices(x, x[..., :1], str(tmp_path / "d" / "demo.png"))
    labels = [ax.get_ylabel() for ax in saved[0].axes if ax.get_label() == "<colorbar>"]
    assert labels == ["input value (channel 0)", "output value"]
