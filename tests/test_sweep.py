"""`convtranspose bench --sweep`: the random layers (reproducible, in range, runnable by every
peer), their classes, the summary statistics, the JSON round trip, and a tiny run end to end.
No timing is asserted: speed is what the bench shows, never what a test checks."""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import convtranspose
from convtranspose import _bench, _isolate, _sweep
from convtranspose._bench import BenchRow, PeerTiming
from convtranspose._sweep import SweepResult, draw_layers, layer_class
from convtranspose._workloads import make_arrays, workload

TINY = (2e-4, 2e-3)  # GFLOP: layers of the real distribution's settings, sized for a test


@pytest.fixture(scope="module")
def draws():
    return draw_layers(500, seed=11)


def test_the_draw_is_reproducible_from_the_seed():
    a, b = draw_layers(40, seed=3), draw_layers(40, seed=3)
    assert a == b
    assert a != draw_layers(40, seed=4)
    # Fewer layers are a prefix of more: a run can be cut short and redone.
    assert draw_layers(10, seed=3) == a[:10]
    assert [w.name for w in a[:3]] == ["S01", "S02", "S03"]


def test_dims_proportions_and_selection(draws):
    share = collections.Counter(w.ndim for w in draws)
    assert abs(share[3] / 500 - 2 / 3) < 0.07
    assert abs(share[2] / 500 - 1 / 4) < 0.06
    assert abs(share[1] / 500 - 1 / 12) < 0.04
    assert {w.ndim for w in draw_layers(30, seed=1, dims=[2])} == {2}
    assert {w.ndim for w in draw_layers(60, seed=1, dims=[1, 3])} == {1, 3}
    assert _sweep.parse_dims("3, 1") == [1, 3]
    for bad in ("4", "", "1,x", "0,2"):
        with pytest.raises(ValueError, match="--dims"):
            _sweep.parse_dims(bad)


def test_every_draw_respects_the_ranges(draws):
    for w in draws:
        what = repr(w)
        assert 0.05 <= w.useful_flops / 1e9 <= 3.0, what
        assert 1 <= w.batch <= 4, what
        assert all(1 <= k <= 7 for k in w.kernel), what
        assert all(1 <= s <= 4 for s in w.stride), what
        assert all(d in (1, 2) for d in w.dilation), what
        assert all(0 <= p <= d * (k - 1) // 2
                   for p, d, k in zip(w.padding, w.dilation, w.kernel)), what
        # Below the stride, hence below PyTorch's max(stride, dilation) too.
        assert all(0 <= o < s for o, s in zip(w.output_padding, w.stride)), what
        assert all(o < max(s, d) for o, s, d in
                   zip(w.output_padding, w.stride, w.dilation)), what
        assert 1 <= w.c_in <= 384 and 1 <= w.c_out <= 384, what
        assert w.c_in % w.groups == 0 and w.c_out % w.groups == 0, what
        depthwise = w.groups == w.c_in and w.groups > 1
        assert w.groups in (1, 2, 4) or depthwise, what
        if depthwise:
            assert w.c_out in (w.c_in, 2 * w.c_in), what
        assert min(w.in_spatial) >= 1, what
        assert math.prod(w.input_shape) <= _sweep.MAX_ELEMS, what
        assert math.prod(w.output_shape) <= _sweep.MAX_ELEMS, what
        assert w.label == layer_class(w), what
        # Our library takes every drawn layer, with the output shape the workload computes.
        assert convtranspose.output_shape(w.input_shape, w.weight_shape,
                                          **w.settings) == w.output_shape, what


def test_the_draw_covers_the_cases_the_issue_names(draws):
    def count(pred):
        return sum(1 for w in draws if pred(w))

    assert count(lambda w: w.c_in == 1) >= 10 and count(lambda w: w.c_in == 3) >= 10
    assert count(lambda w: w.c_out == 1) >= 10 and count(lambda w: w.c_out == 3) >= 10
    assert count(lambda w: any(s > k for s, k in zip(w.stride, w.kernel))) >= 20
    assert count(lambda w: max(w.stride) >= 3) >= 20
    assert count(lambda w: max(w.dilation) == 2) >= 20
    assert count(lambda w: any(o > 0 for o in w.output_padding)) >= 20
    assert count(lambda w: w.groups == 2 and w.c_in > 2) >= 10
    assert count(lambda w: w.groups == 4 and w.c_in > 4) >= 10
    assert count(lambda w: w.groups == w.c_in > 1 and w.c_out == w.c_in) >= 10
    assert count(lambda w: w.groups == w.c_in > 1 and w.c_out == 2 * w.c_in) >= 10
    assert count(lambda w: w.ndim > 1 and len(set(w.kernel)) > 1) >= 10  # anisotropic
    assert count(lambda w: max(w.kernel) >= 5 and w.c_in <= 8) >= 10
    assert {w.batch for w in draws} == {1, 2, 3, 4}
    assert set(collections.Counter(w.label for w in draws)) == set(_sweep.CLASSES)
    gflop = sorted(w.useful_flops / 1e9 for w in draws)
    assert gflop[len(gflop) // 10] < 0.2 and gflop[-len(gflop) // 10] > 1.0  # spread out


def test_pytorch_and_onnx_runtime_run_drawn_layers():
    """PyTorch's own module takes the drawn settings (its rules on output_padding included);
    the bench's runners (1-D, 2-D, 3-D) agree with ours; ONNX Runtime agrees or says n/a."""
    layers = draw_layers(24, seed=5, gflop_range=TINY)
    assert {w.ndim for w in layers} == {1, 2, 3}
    for w in layers[:8]:
        module = getattr(torch.nn, f"ConvTranspose{w.ndim}d")(
            w.c_in, w.c_out, w.kernel, stride=w.stride, padding=w.padding,
            output_padding=w.output_padding, groups=w.groups, dilation=w.dilation,
            bias=False)
        x = torch.zeros(w.batch, w.c_in, *w.in_spatial)
        assert tuple(module(x).shape) == (w.batch, w.c_out, *w.out_spatial), w
    for w in layers:
        x, wt = make_arrays(w)
        ours = getattr(convtranspose, f"conv_transpose{w.ndim}d")(x, wt, **w.settings)
        variants = _bench.torch_runners(w, x, wt, None)
        assert set(variants) == ({"ncw"} if w.ndim == 1 else
                                 {_bench.TORCH_FIRST[w.ndim], "cl"})
        for runner in variants.values():
            assert _bench.relative_error(runner.to_ours(runner.call()), ours) < 1e-5, w
        try:
            (runner,) = _bench.ort_runners(w, x, wt, None, threads=1).values()
        except _bench.Unavailable:
            continue
        assert _bench.relative_error(runner.to_ours(runner.call()), ours) < 1e-5, w


def test_torch_gradients_in_1d_and_2d_match_ours():
    for w in (workload("a", "", 2, 9, 4, 6, 3, 2, 1, 1, groups=2, ndim=1),
              workload("b", "", 1, (5, 4), 3, 6, (3, 2), (2, 1), (1, 0), ndim=2, dilation=2)):
        x, wt = make_arrays(w, np.float64)
        g = np.random.default_rng(1).standard_normal(w.output_shape)
        want = getattr(convtranspose, f"conv_transpose{w.ndim}d_vjp")(x, wt, g, **w.settings)
        for runner in _bench.torch_runners(w, x, wt, g).values():
            got = runner.to_ours(runner.call())
            for a, b in zip(got, want):
                assert _bench.relative_error(a, b) < 1e-10


# ------------------------------------------------------------------ classes


@pytest.mark.parametrize("layer, cls", [
    (workload("t", "", 1, 8, 16, 3, 4, 2, 1, ndim=2), "thin-out"),
    (workload("t", "", 1, 8, 64, 128, 3, 2, 1, groups=64), "multiplier"),
    (workload("t", "", 1, 16, 64, 64, 3, 2, 1, groups=64, ndim=2), "other"),  # not thin
    (workload("t", "", 1, 8, 16, 3, 4, 1, 1), "other"),  # thin, but stride 1
    (workload("t", "", 1, 8, 16, 16, 2, 3), "stride>k"),
    (workload("t", "", 1, (6, 6, 7), 128, 64, 3, 1, 1), "small-wide"),
    (workload("t", "", 1, 16, 4, 32, 5, 1, 2), "few-in-big-k"),
    (workload("t", "", 1, 32, 8, 16, 3, 1, 1, ndim=2), "small-1d2d"),
    (workload("t", "", 1, 32, 64, 64, 3, 2, 1), "other"),
])
def test_layer_class_first_rule_that_fits(layer, cls):
    assert layer_class(layer) == cls


# ------------------------------------------------------------------ summary (pure)


def test_summary_statistics_on_given_numbers():
    s = _sweep.summarize([4.0, None, 0.5, 2.0, 1.0])
    assert s["n"] == 4
    assert s["geomean"] == pytest.approx((4.0 * 0.5 * 2.0 * 1.0) ** 0.25)
    # Linear between ranks: sorted 0.5, 1, 2, 4; rank 0.1 * 3 = 0.3 -> 0.5 + 0.3 * 0.5.
    assert s["p10"] == pytest.approx(0.65)
    assert s["worst"] == 0.5
    assert _sweep.summarize([None])["geomean"] is None
    f = _sweep.summarize_factors([2.0, 0.25, None, 1.5])
    assert f["n"] == 3 and f["median"] == pytest.approx(1.5)
    assert f["worst"] == 0.25  # 4x off, though below 1
    assert _sweep.summarize_factors([3.0, 0.5])["worst"] == 3.0


def _result(name, ratio, pred=None, torch_ms=10.0, cls="other"):
    wl = workload(name, cls, 1, 4, 8, 8, 3, 2, 1, 1)
    row = BenchRow(wl.title, wl.useful_flops, torch_ms / ratio, error=1e-7,
                   peers={_bench.TORCH: PeerTiming(torch_ms, variant="cl"),
                          _bench.ORT: PeerTiming(torch_ms * 2)})
    return SweepResult(wl, row, pred)


def test_results_table_summary_and_worst_on_given_numbers():
    results = [_result("S01", 2.0, pred=4.0), _result("S02", 0.5, pred=10.0),
               _result("S03", 1.0)]
    assert results[0].best == ("torch cl", 10.0)
    assert results[1].ratio == pytest.approx(0.5)
    assert results[0].factor == pytest.approx(5.0 / 4.0)
    assert results[2].factor is None
    assert _result("S04", 1.0, pred=0.0).factor is None  # no tap lands: planned as free
    header, body = _sweep.sweep_table(results + [_result("S04", 1.0, pred=0.0)])
    assert header[-2:] == ["pred ms", "meas/pred"]
    assert body[1][header.index("x peer")] == "0.50"
    assert body[1][header.index("best peer ms")] == "10.0 (torch cl)"
    assert body[0][header.index("C_in->C_out")] == "8->8"
    lines = _sweep.summary_lines(results)
    assert "geomean 1.00x" in lines[0] and "worst 0.50x (S02" in lines[0]
    assert "median" in lines[1] and "worst 2.00 (S02)" in lines[1]
    assert [r.layer.name for r in _sweep.worst_results(results, 2)] == ["S02", "S03"]
    # Without predictions (gradients today): no such columns, and the summary says why.
    for r in results:
        r.predicted_ms = None
    header, _ = _sweep.sweep_table(results, grad=True)
    assert "pred ms" not in header and "best torch ms" in header
    assert "no backward plan" in _sweep.summary_lines(results, grad=True)[1]


def test_predicted_seconds_is_the_plans_estimate_for_its_algorithm(monkeypatch):
    wl = workload("p", "", 1, 16, 32, 32, 3, 2, 1, 1)
    plan = convtranspose.plan(wl.input_shape, wl.weight_shape, **wl.settings)
    assert plan.algorithm in plan.est_seconds  # not an 'indexed' call: it has an estimate
    got = _sweep.predicted_seconds(wl, np.float32, None, grad=False)
    assert got == pytest.approx(plan.est_seconds[plan.algorithm])
    # Gradients: from convtranspose.vjp_plan when the backward has a plan, else none.
    monkeypatch.delattr(convtranspose, "vjp_plan", raising=False)
    assert _sweep.predicted_seconds(wl, np.float32, None, grad=True) is None

    class FakePlan:
        algorithm = "b"
        est_seconds = {"a": 1.0, "b": 0.25}

    monkeypatch.setattr(convtranspose, "vjp_plan", lambda *a, **k: FakePlan(), raising=False)
    assert _sweep.predicted_seconds(wl, np.float32, None, grad=True) == 0.25


def test_an_unreliable_row_is_marked():
    r = _result("S01", 2.0)
    r.row.spread = {"ours": 0.05, "PyTorch (cl)": 0.6}
    assert _bench.unreliable(r.row) == {"PyTorch (cl)": 0.6} and _bench.flagged(r.row)
    _, body = _sweep.sweep_table([r])
    assert body[0][15].endswith(_bench.UNRELIABLE)
    r.row.spread = {"ours": 0.05, "MLX": 0.9}  # not one of the peers the ratio is against
    assert not _bench.flagged(r.row)


def test_sweep_chart_from_given_results(tmp_path):
    results = [_result(f"S{i:02d}", r, cls=c) for i, (r, c) in enumerate(
        [(0.3, "thin-out"), (1.2, "other"), (2.5, "multiplier")])]
    path = tmp_path / "s.png"
    assert _sweep.write_sweep_chart(results, str(path), "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ JSON


def test_layers_round_trip_through_json(tmp_path):
    layers = draw_layers(12, seed=2)
    results = [SweepResult(w, BenchRow(w.title, w.useful_flops, 1.0)) for w in layers]
    text = _sweep.dump_json(_sweep.results_json(results, {"seed": 2}))
    data = json.loads(text)
    assert data["seed"] == 2 and len(data["results"]) == 12
    assert [_sweep.layer_from_dict(d) for d in data["layers"]] == layers
    path = tmp_path / "l.json"
    path.write_text(text)
    assert _sweep.load_layers(str(path)) == layers
    path.write_text(json.dumps(data["layers"][:2]))  # a plain list of layers works too
    assert _sweep.load_layers(str(path)) == layers[:2]
    bad = dict(data["layers"][0], kernel=[3, 3, 3, 3])
    with pytest.raises(ValueError, match="one entry per spatial axis"):
        _sweep.layer_from_dict(bad)


# ------------------------------------------------------------------ crash isolation


def test_a_worker_that_dies_is_reported_and_replaced():
    import isolate_tasks  # tests/: the spawned worker imports it by the same name

    logs = []
    with _isolate.Worker(isolate_tasks.setup, ("got ",), isolate_tasks.work,
                         logs.append) as worker:
        first, pid = worker.run("a")
        assert first == "a" and worker.run("b")[1] == pid  # one process for both
        with pytest.raises(_isolate.WorkerDied, match="SIGABRT") as died:
            worker.run("abort")
        assert died.value.exitcode == -signal.SIGABRT
        again, new_pid = worker.run("c")  # a fresh worker, set up again
        assert again == "c" and new_pid not in (pid, os.getpid())
    assert logs == ["got a", "got b", "got c"]


class _FakeWorker:
    """Runs tasks in-process; a task whose peers hold any of `crashing` (all together:
    `together`) dies, as a worker would."""

    def __init__(self, crashing=(), together=False, ours_crashes=False):
        self.crashing, self.together, self.ours_crashes = set(crashing), together, ours_crashes
        self.tasks = []

    def run(self, task):
        self.tasks.append(task.peers)
        peers = set(task.peers)
        if (self.ours_crashes or peers & self.crashing
                or (self.together and len(peers) > 1)):
            raise _isolate.WorkerDied(-signal.SIGSEGV)
        row = BenchRow(task.layer.title, 1, 1.0)
        row.peers = {p: PeerTiming(2.0) for p in task.peers}
        return row


def _task(peers):
    wl = draw_layers(1, seed=3, gflop_range=TINY)[0]
    return _sweep.LayerTask(wl, tuple(peers), "float32", 1, None, False, "3/S01")


def test_a_crash_is_pinned_on_the_contender_that_caused_it():
    logs = []
    worker = _FakeWorker(crashing={"torch"})
    row = _sweep._time_in_worker(worker, _task(["torch", "ort"]), logs.append)
    assert worker.tasks == [("torch", "ort"), (), ("torch",), ("ort",), ("ort",)]
    assert row.peers["torch"].note == _sweep.CRASHED and row.peers["torch"].ms is None
    assert row.peers["ort"].ms == 2.0 and not row.failure
    assert any("torch crashed the process (signal SIGSEGV)" in line for line in logs)
    # Each alone runs, together they crash: ours alone stands, both marked.
    row = _sweep._time_in_worker(_FakeWorker(together=True), _task(["torch", "ort"]),
                                 logs.append)
    assert {p: t.note for p, t in row.peers.items()} == {"torch": _sweep.CRASHED,
                                                         "ort": _sweep.CRASHED}
    # Ours crashes alone: the row is our failure, never a peer's.
    row = _sweep._time_in_worker(_FakeWorker(ours_crashes=True), _task(["torch"]),
                                 logs.append)
    assert "convtranspose crashed the process" in row.failure and row.ours_ms is None


# ------------------------------------------------------------------ end to end


def _args(**kw):
    base = dict(sweep=2, seed=7, dims="1,2,3", layers=None, show_worst=None, out=None,
                dtype="float32", rounds=1, threads=None, grad=False, mlx=False)
    return argparse.Namespace(**{**base, **kw})


def test_tiny_sweep_end_to_end_and_rerun_of_its_worst(tmp_path):
    logs = []
    out = tmp_path / "s"
    assert _sweep.run_sweep(_args(out=str(out), show_worst=1), gflop_range=TINY,
                            log=logs.append) == 0
    text = "\n".join(logs)
    assert "kernel: " in text and "machine: " in text
    assert "S01 " in text and "S02 " in text and "10th percentile" in text
    assert "planner: measured / predicted" in text or "planner: no predicted" in text
    md = (out / "sweep.md").read_text()
    assert "| S01 |" in md and "| S02 |" in md and "geomean" in md
    data = json.loads((out / "sweep.json").read_text())
    layers = draw_layers(2, seed=7, gflop_range=TINY)
    assert [_sweep.layer_from_dict(d) for d in data["layers"]] == layers
    assert all(r["ours_ms"] > 0 and r["error"] < 1e-5 for r in data["results"])
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    worst = json.loads((out / "worst.json").read_text())
    assert len(worst["layers"]) == 1
    # --layers re-times the given layers, with the gradients this time: no ONNX Runtime.
    logs.clear()
    assert _sweep.run_sweep(_args(sweep=None, layers=str(out / "worst.json"), grad=True),
                            log=logs.append) == 0
    text = "\n".join(logs)
    assert "1 layer(s) from" in text and worst["layers"][0]["name"] in text
    assert "ONNX" not in text and "PyTorch's backward" in text


def test_sweep_command_line(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "convtranspose", "bench", *args],
                              capture_output=True, text=True, timeout=120)

    res = cli("--help")
    for flag in ("--sweep", "--seed", "--dims", "--layers", "--show-worst"):
        assert flag in res.stdout
    res = cli("--sweep", "2", "--dims", "4")
    assert res.returncode == 2 and "--dims" in res.stderr
    res = cli("--layers", str(tmp_path / "missing.json"))
    assert res.returncode == 2 and "missing.json" in res.stderr
