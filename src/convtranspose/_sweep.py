"""`convtranspose bench --sweep N`: random realistic layers, ours against the faster peer.

The layers are drawn reproducibly from a seed (`draw_layers`), timed by the W1-W9 bench's
own machinery (`_bench.bench_workload`: the same fair timing, peer checks and runners), and
summarised by the geomean, 10th percentile and worst ratio (`summarize`), beside the
planner's predicted time for each of our calls (`predicted_seconds`).

The draw (issue 19): about 2/3 3-D, 1/4 2-D, the rest 1-D; kernel 1-7 per axis (mostly the
same on every axis); stride 1-4 (stride > kernel included); dilation 1-2; padding from 0 to
dilation*(k-1)//2; output_padding below the stride (so below PyTorch's max(stride,
dilation) too); C_in and C_out 1-384 with 1 and 3 often; groups 1, 2, 4 and depthwise
(groups == C_in) with channel multipliers 1 and 2; batch 1-4; the spatial size chosen so
that the layer does 0.05-3 useful GFLOP, no array above MAX_ELEMS elements.

Each layer has one class (`layer_class`), the first of CLASSES whose rule fits; see there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

import convtranspose

from . import _bench
from ._bench import BEST_OF, ORT, SHORT, TORCH, BenchRow
from ._geometry import ceil_div
from ._isolate import Worker, WorkerDied, describe_exit
from ._workloads import Workload, resolve_dtype

DIM_SHARES = {3: 2 / 3, 2: 1 / 4, 1: 1 / 12}
GFLOP_RANGE = (0.05, 3.0)
MAX_ELEMS = 16 * 2**20  # per input or output array (64 MiB in float32): a laptop's layer
MAX_CHANNELS = 384
KERNEL_WEIGHTS = (1, 3, 4, 3, 2, 1.5, 1.5)  # k = 1..7
STRIDE_WEIGHTS = (3, 4, 1.5, 1.5)            # s = 1..4
TYPICAL_CHANNELS = (4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384)

# The classes, in the order their rules are tried (the first that fits labels the layer):
# - thin-out: C_out/groups <= 3 and a stride >= 2, depthwise layers excepted (their
#   C_out/groups is 1 or 2 by construction; they fall to the rules below);
# - multiplier: depthwise (groups == C_in > 1) with C_out == 2*C_in;
# - stride>k: some axis has a stride larger than its kernel (taps miss whole phases);
# - small-wide: at most 8 input pixels per axis on average (prod(in)**(1/dims) <= 8) and
#   C_in, C_out >= 64;
# - few-in-big-k: C_in <= 8 and a kernel of 5 or more on some axis;
# - small-1d2d: 1-D or 2-D with C_in, C_out <= 32 and at most 0.5 useful GFLOP;
# - other.
CLASSES = ("thin-out", "multiplier", "stride>k", "small-wide", "few-in-big-k", "small-1d2d",
           "other")


def layer_class(wl: Workload) -> str:
    """The layer's class: the first rule of CLASSES that fits."""
    depthwise = wl.groups == wl.c_in and wl.groups > 1
    if not depthwise and wl.c_out // wl.groups <= 3 and max(wl.stride) >= 2:
        return "thin-out"
    if depthwise and wl.c_out == 2 * wl.c_in:
        return "multiplier"
    if any(s > k for s, k in zip(wl.stride, wl.kernel)):
        return "stride>k"
    if math.prod(wl.in_spatial) <= 8 ** wl.ndim and min(wl.c_in, wl.c_out) >= 64:
        return "small-wide"
    if wl.c_in <= 8 and max(wl.kernel) >= 5:
        return "few-in-big-k"
    if wl.ndim <= 2 and max(wl.c_in, wl.c_out) <= 32 and wl.useful_flops <= 0.5e9:
        return "small-1d2d"
    return "other"


# --------------------------------------------------------------------------------------------
# Drawing layers


def _per_axis(rng: random.Random, ndim: int, draw: Callable[[], int],
              same: float = 0.8) -> tuple[int, ...]:
    """One value on every axis (probability `same`), else one per axis."""
    if ndim == 1 or rng.random() < same:
        return (draw(),) * ndim
    return tuple(draw() for _ in range(ndim))


def _channels(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.1:
        return 1
    if r < 0.2:
        return 3
    if r < 0.7:
        return rng.choice(TYPICAL_CHANNELS)
    return min(MAX_CHANNELS, round(math.exp(rng.uniform(0.0, math.log(MAX_CHANNELS)))))


def _round_up(c: int, multiple: int) -> int:
    return min(MAX_CHANNELS, max(multiple, ceil_div(c, multiple) * multiple))


def _channels_and_groups(rng: random.Random) -> tuple[int, int, int]:
    """(C_in, C_out, groups): groups 1 (60%), 2 and 4 (10% each), depthwise (20%, channel
    multiplier 1 or 2)."""
    r = rng.random()
    if r < 0.6:
        return _channels(rng), _channels(rng), 1
    if r < 0.8:
        g = 2 if r < 0.7 else 4  # C_in > g: groups == C_in is the depthwise case below
        return _round_up(max(_channels(rng), g + 1), g), _round_up(_channels(rng), g), g
    multiplier = 1 if r < 0.9 else 2
    c_in = min(max(2, _channels(rng)), MAX_CHANNELS // multiplier)
    return c_in, multiplier * c_in, c_in


def _spatial(rng: random.Random, ndim: int, pixels: float) -> tuple[int, ...]:
    """About `pixels` input pixels over `ndim` axes, the axes within ~2x of each other."""
    logs = [rng.uniform(-0.4, 0.4) for _ in range(ndim)]
    mean = sum(logs) / ndim
    side = pixels ** (1 / ndim)
    return tuple(max(1, round(side * math.exp(v - mean))) for v in logs)


def draw_layer(rng: random.Random, ndim: int, name: str,
               gflop_range: tuple[float, float] = GFLOP_RANGE) -> Workload | None:
    """One random layer of `ndim` spatial axes, or None when this draw cannot be sized
    within `gflop_range` and MAX_ELEMS (the caller draws again)."""
    kernel = _per_axis(rng, ndim, lambda: rng.choices(range(1, 8), KERNEL_WEIGHTS)[0])
    stride = _per_axis(rng, ndim, lambda: rng.choices(range(1, 5), STRIDE_WEIGHTS)[0])
    dilation = (2 if rng.random() < 0.2 else 1,) * ndim
    mode = rng.random()  # padding: none, 'same'-like (the most), or anything in between
    padding = tuple(0 if mode < 0.35 else d * (k - 1) // 2 if mode < 0.75
                    else rng.randint(0, d * (k - 1) // 2) for k, d in zip(kernel, dilation))
    output_padding = tuple(rng.randint(0, s - 1) if rng.random() < 0.4 else 0 for s in stride)
    c_in, c_out, groups = _channels_and_groups(rng)
    batch = rng.randint(1, 4)
    per_pixel = 2 * batch * c_in * (c_out // groups) * math.prod(kernel)  # FLOPs per input
    lo, hi = (g * 1e9 / per_pixel for g in gflop_range)
    if hi < 1:
        return None
    target = math.exp(rng.uniform(math.log(max(lo, 1.0)), math.log(hi)))
    for _ in range(8):  # rounding the sides can leave the range: draw the aspect again
        wl = Workload(name, "", batch, _spatial(rng, ndim, target), c_in, c_out, kernel,
                      stride, padding, output_padding, groups, dilation)
        gflop = wl.useful_flops / 1e9
        if (gflop_range[0] <= gflop <= gflop_range[1]
                and math.prod(wl.input_shape) <= MAX_ELEMS
                and math.prod(wl.output_shape) <= MAX_ELEMS):
            return Workload(name, layer_class(wl), batch, wl.in_spatial, c_in, c_out, kernel,
                            stride, padding, output_padding, groups, dilation)
    return None


def draw_layers(n: int, seed: int, dims: Sequence[int] = (1, 2, 3),
                gflop_range: tuple[float, float] = GFLOP_RANGE) -> list[Workload]:
    """`n` random layers, the same for the same (seed, dims, gflop_range); the spatial
    dimensions in DIM_SHARES' proportions among `dims`."""
    rng = random.Random(seed)
    dims = sorted(set(dims))
    shares = [DIM_SHARES[d] for d in dims]
    layers = []
    for i in range(n):
        ndim = rng.choices(dims, shares)[0]
        name = f"S{i + 1:02d}"
        wl = None
        while wl is None:
            wl = draw_layer(rng, ndim, name, gflop_range)
        layers.append(wl)
    return layers


def parse_dims(text: str) -> list[int]:
    try:
        dims = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        dims = []
    if not dims or any(d not in DIM_SHARES for d in dims):
        raise ValueError(f"--dims: expected a comma-separated list of 1, 2 and 3, got {text!r}")
    return dims


# --------------------------------------------------------------------------------------------
# Layers as JSON (sweep.json, worst.json; read back by --layers)

_TUPLES = ("in_spatial", "kernel", "stride", "padding", "output_padding", "dilation")


def layer_to_dict(wl: Workload) -> dict[str, Any]:
    d = asdict(wl)
    d.pop("label")  # derived: layer_class
    return {k: list(v) if k in _TUPLES else v for k, v in d.items()}


def layer_from_dict(d: dict[str, Any]) -> Workload:
    fields = {k: tuple(int(e) for e in d[k]) if k in _TUPLES else d[k]
              for k in ("name", "batch", "c_in", "c_out", "groups", *_TUPLES)}
    wl = Workload(label="", **fields)
    if len({len(getattr(wl, k)) for k in _TUPLES}) != 1 or not 1 <= wl.ndim <= 3:
        raise ValueError(f"layer {wl.name}: every tuple needs one entry per spatial axis "
                         f"(1 to 3), got {d}")
    return Workload(**{**asdict(wl), "label": layer_class(wl)})


def load_layers(path: str) -> list[Workload]:
    """The layers of a file written by --out (sweep.json, worst.json) or a JSON list."""
    with open(path) as f:
        data = json.load(f)
    items = data["layers"] if isinstance(data, dict) else data
    return [layer_from_dict(d) for d in items]


# --------------------------------------------------------------------------------------------
# Results (pure, testable)


@dataclass
class SweepResult:
    layer: Workload
    row: BenchRow
    predicted_ms: float | None = None  # the planner's estimate for our call

    @property
    def best(self) -> tuple[str, float] | None:
        """(peer (variant), its ms) of the faster correct peer, or None."""
        best = None
        for peer in BEST_OF:
            t = self.row.peers.get(peer)
            if t is not None and t.ms is not None and not t.mismatch and (
                    best is None or t.ms < best[1]):
                best = (SHORT[peer] + (f" {t.variant}" if t.variant else ""), t.ms)
        return best

    @property
    def ratio(self) -> float | None:
        return _bench.best_ratio(self.row)

    @property
    def factor(self) -> float | None:
        """measured / predicted (above 1: slower than the planner thinks)."""
        if not self.predicted_ms or not self.row.ours_ms:  # none, or a layer no tap
            return None  # reaches, planned as free (seed 23's 64 -> 256 k6 on 2x1x2)
        return self.row.ours_ms / self.predicted_ms


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, linear between the closest ranks (NumPy's default)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarize(ratios: Sequence[float | None]) -> dict[str, float | int | None]:
    """n, geomean, 10th percentile (p10) and worst (smallest) of the ratios present."""
    vals = [r for r in ratios if r is not None and r > 0]
    if not vals:
        return {"n": 0, "geomean": None, "p10": None, "worst": None}
    return {"n": len(vals), "geomean": _bench.geomean(vals), "p10": percentile(vals, 10),
            "worst": min(vals)}


def summarize_factors(factors: Sequence[float | None]) -> dict[str, float | int | None]:
    """n, median and worst of measured/predicted factors; the worst is the farthest from 1
    either way (a factor of 0.25 is as bad as 4)."""
    vals = [f for f in factors if f is not None and f > 0]
    if not vals:
        return {"n": 0, "median": None, "worst": None}
    return {"n": len(vals), "median": percentile(vals, 50),
            "worst": max(vals, key=lambda f: abs(math.log(f)))}


def _dims_text(values: Sequence[int]) -> str:
    """'3' when every axis agrees, else '3x4x4'."""
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


def _fmt_x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def sweep_table(results: Sequence[SweepResult], grad: bool = False
                ) -> tuple[list[str], list[list[str]]]:
    """Header and body of the sweep's table, a row per layer (no summary rows)."""
    with_pred = any(r.predicted_ms is not None for r in results)
    peer_word = "torch" if grad else "peer"
    header = ["layer", "class", "dims", "N", "in", "C_in->C_out", "k", "s", "p", "d", "op",
              "g", "GFLOP" + (" (grads)" if grad else ""), "ours ms", f"best {peer_word} ms",
              f"x {peer_word}", "err"]
    if with_pred:
        header += ["pred ms", "meas/pred"]
    body = []
    for r in results:
        wl, row = r.layer, r.row
        best = r.best
        cells = [wl.name, wl.label, f"{wl.ndim}-D", str(wl.batch), "x".join(map(str,
                 wl.in_spatial)), f"{wl.c_in}->{wl.c_out}", _dims_text(wl.kernel),
                 _dims_text(wl.stride), _dims_text(wl.padding), _dims_text(wl.dilation),
                 _dims_text(wl.output_padding), str(wl.groups), f"{row.flops / 1e9:.3f}",
                 "FAILED" if row.failure else _bench._fmt_ms(row.ours_ms),
                 "n/a" if best is None else f"{_bench._fmt_ms(best[1])} ({best[0]})",
                 _fmt_x(r.ratio) + (_bench.UNRELIABLE if _bench.flagged(row) else ""),
                 "-" if row.error is None else f"{row.error:.1e}"]
        if with_pred:
            cells += [_bench._fmt_ms(r.predicted_ms), _fmt_x(r.factor)]
        body.append(cells)
    return header, body


def summary_lines(results: Sequence[SweepResult], grad: bool = False) -> list[str]:
    """The sweep's verdict: geomean, 10th percentile and worst ratio, and how far the
    planner's predictions are from the measured times."""
    against = "PyTorch's backward" if grad else "the faster of PyTorch and ONNX Runtime"
    what = "both gradients" if grad else "forward"
    s = summarize([r.ratio for r in results])
    lines = []
    if s["n"]:
        worst = min((r for r in results if r.ratio), key=lambda r: r.ratio)
        lines.append(f"{what} against {against}, {s['n']} layer(s): geomean "
                     f"{s['geomean']:.2f}x, 10th percentile {s['p10']:.2f}x, worst "
                     f"{s['worst']:.2f}x ({worst.layer.name} {worst.layer.label})")
    else:
        lines.append(f"{what}: no layer has a ratio against {against}")
    f = summarize_factors([r.factor for r in results])
    if f["n"]:
        worst = max((r for r in results if r.factor), key=lambda r: abs(math.log(r.factor)))
        lines.append(f"planner: measured / predicted time over {f['n']} layer(s): median "
                     f"{f['median']:.2f}, worst {f['worst']:.2f} ({worst.layer.name})")
    else:
        lines.append("planner: no predicted time" + (" for gradients (no backward plan yet)"
                                                     if grad else ""))
    return lines


def worst_results(results: Sequence[SweepResult], k: int) -> list[SweepResult]:
    """The k results with the lowest ratio (those without one first: failures, n/a)."""
    return sorted(results, key=lambda r: -1.0 if r.ratio is None else r.ratio)[:k]


def results_json(results: Sequence[SweepResult], meta: dict[str, Any]) -> dict[str, Any]:
    """sweep.json: the run's settings, the layers (for --layers), and each one's figures."""
    out = []
    for r in results:
        best = r.best
        out.append({"name": r.layer.name, "class": r.layer.label,
                    "gflop": r.row.flops / 1e9, "ours_ms": r.row.ours_ms,
                    "peer": best and best[0], "peer_ms": best and best[1], "ratio": r.ratio,
                    "error": r.row.error, "predicted_ms": r.predicted_ms,
                    "failure": r.row.failure or None,
                    "unreliable": _bench.unreliable(r.row) or None})
    return {**meta, "layers": [layer_to_dict(r.layer) for r in results], "results": out}


def dump_json(data: dict[str, Any]) -> str:
    """JSON with one line per top-level key, and per entry of a top-level list (a layer, a
    result), so that a file of layers reads, diffs and edits by line."""
    lines = []
    for key, value in data.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            items = ",\n  ".join(json.dumps(v) for v in value)
            lines.append(f" {json.dumps(key)}: [\n  {items}\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_sweep_chart(results: Sequence[SweepResult], path: str, title: str = "",
                      grad: bool = False) -> bool:
    """Left: the ratios sorted, bars coloured by class, a line at 1.0 (log axis). Right: the
    ratio against the layer's GFLOP. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return False

    times = FuncFormatter(lambda v, _: f"{v:g}x")
    have = sorted((r for r in results if r.ratio), key=lambda r: r.ratio)
    palette = plt.get_cmap("tab10").colors
    colours = dict(zip(CLASSES, palette[:len(CLASSES) - 1]))
    colours["other"] = "0.65"  # grey: the classes to look at stand out
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(9.0, 0.28 * len(have) + 5), 4.6),
                                      dpi=110, gridspec_kw={"width_ratios": [2.2, 1]})
    xs = np.arange(len(have))
    bars = left.bar(xs, [r.ratio for r in have], 0.8,
                    color=[colours[r.layer.label] for r in have])
    for bar, r in zip(bars, have):
        if _bench.flagged(r.row):
            bar.set_hatch("///")
            bar.set_edgecolor("white")
    left.set_yscale("log")
    left.axhline(1.0, color="0.2", lw=1)
    left.set_xticks(xs)
    left.set_xticklabels([r.layer.name for r in have], rotation=90, fontsize=7)
    peer = "PyTorch's backward" if grad else "the faster peer"
    left.set_ylabel(f"{peer} time / ours (above 1: we are faster)")
    left.grid(axis="y", which="both", alpha=0.3)
    for cls in CLASSES:
        pts = [r for r in have if r.layer.label == cls]
        if pts:
            right.scatter([r.row.flops / 1e9 for r in pts], [r.ratio for r in pts], s=22,
                          color=colours[cls], label=f"{cls} ({len(pts)})")
    right.set_xscale("log")
    right.set_yscale("log")
    right.axhline(1.0, color="0.2", lw=1)
    right.set_xlabel("useful GFLOP" + (" (both gradients)" if grad else ""))
    right.grid(which="both", alpha=0.3)
    handles, _ = right.get_legend_handles_labels()
    if any(_bench.flagged(r.row) for r in have):
        handles.append(Patch(facecolor="0.8", hatch="///", edgecolor="white",
                             label=f"hatched: spread > {100 * _bench.SPREAD_LIMIT:.0f}%"))
    right.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                 title="class", title_fontsize=7)
    lo = min([r.ratio for r in have] + [1.0])
    hi = max([r.ratio for r in have] + [1.0])
    for ax in (left, right):
        ax.set_ylim(lo / 1.3, hi * 1.3)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(times)
        ax.yaxis.set_minor_formatter(NullFormatter())
    right.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    right.xaxis.set_minor_formatter(NullFormatter())
    s = summarize([r.ratio for r in have])
    verdict = (f"geomean {s['geomean']:.2f}x, p10 {s['p10']:.2f}x, worst {s['worst']:.2f}x"
               if s["n"] else "no ratios")
    fig.suptitle(f"{title}: {verdict}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# Running


def predicted_seconds(wl: Workload, dtype: Any, threads: int | None, grad: bool
                      ) -> float | None:
    """The planner's predicted time for our call: the chosen algorithm's entry of the plan's
    est_seconds. Gradients: from `convtranspose.vjp_plan` once the backward has a plan
    (the one place to change when it comes); None without a prediction."""
    kw = dict(**wl.settings, dtype=dtype, threads=threads)
    try:
        if grad:
            vjp_plan = getattr(convtranspose, "vjp_plan", None)
            if vjp_plan is None:
                return None
            p = vjp_plan(wl.input_shape, wl.weight_shape, **kw)
        else:
            p = convtranspose.plan(wl.input_shape, wl.weight_shape, **kw)
    except Exception:  # noqa: BLE001 - a missing prediction must not stop the run
        return None
    est = getattr(p, "est_seconds", None) or {}
    value = est.get(getattr(p, "algorithm", None))
    return None if value is None else float(value)


def run_sweep(args: argparse.Namespace, gflop_range: tuple[float, float] = GFLOP_RANGE,
              log: Callable[[str], None] = print) -> int:
    """The command with --sweep or --layers (`gflop_range`: tests draw tiny layers)."""
    started = time.perf_counter()
    try:
        dt = resolve_dtype(args.dtype)
        dims = parse_dims(args.dims)
        if args.layers:
            layers = load_layers(args.layers)[:args.sweep or None]
            source = f"{len(layers)} layer(s) from {args.layers}"
        else:
            layers = draw_layers(args.sweep, args.seed, dims, gflop_range)
            source = (f"{len(layers)} random layer(s), seed {args.seed}, dims "
                      f"{','.join(map(str, dims))}")
    except (ValueError, OSError, KeyError, TypeError) as exc:
        print(f"convtranspose bench: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "mlx", False):
        log("(--mlx is for W1-W9 only: the sweep times PyTorch and ONNX Runtime)")
    args.mlx = False
    threads = args.threads
    found, missing = _bench.setup_peers(args, threads)
    peers = [p for p in (TORCH, ORT) if p in found]
    kind = "gradients (vjp) against PyTorch's backward" if args.grad else "forward"
    log(f"convtranspose {convtranspose.__version__} bench --sweep: {source}; {dt.name}, "
        f"{kind}, median of {args.rounds} round(s)")
    head = _bench.header_lines(threads, found, missing, None)
    for line in head:
        log(line)

    results = []
    with Worker(_timing_setup, (args.grad, threads), _time_layer, log) as worker:
        for wl in layers:
            task = LayerTask(wl, tuple(peers), dt.name, args.rounds, threads, args.grad,
                             f"{args.seed}/{wl.name}")
            row = _time_in_worker(worker, task, log)
            results.append(SweepResult(wl, row, None if row.failure else _ms(
                predicted_seconds(wl, dt, threads, args.grad))))
    elapsed = time.perf_counter() - started

    header, body = sweep_table(results, args.grad)
    log("")
    log(_bench.format_text(header, body))
    summary = summary_lines(results, args.grad)
    for line in summary:
        log(line)
    notes = [
        "x peer = the faster peer's time / ours (above 1: we are faster); PyTorch: the faster "
        "of its contiguous (nc...) and channels-last (cl) layouts; ONNX Runtime: nc...; "
        + ("gradients: PyTorch's backward of the same layer (ONNX Runtime has none). "
           if args.grad else "") + _bench.TIMING_NOTE,
        "err = max|ours - ours in float64| / max|ours in float64| (both gradients: the larger)"
        "; pred ms = the planner's estimate for the algorithm it chose (convtranspose.plan's "
        "est_seconds); meas/pred = our median / that estimate.",
        "class: the first that fits of " + ", ".join(CLASSES) + " (rules in "
        "convtranspose/_sweep.py).",
    ]
    failures = [f"{r.layer.name}: convtranspose failed: {r.row.failure}"
                for r in results if r.row.failure]
    crashes = [f"{r.layer.name}: {p} crashed the process; timed without it"
               for r in results for p, t in r.row.peers.items() if t.note == CRASHED]
    mismatches = [f"{r.layer.name}: {p} output differs from ours (rel. error {t.error:.2e})"
                  for r in results for p, t in r.row.peers.items() if t.mismatch]
    shaky = [r.layer.name for r in results if _bench.flagged(r.row)]
    for m in mismatches:
        log(f"!!! MISMATCH {m}")
    for f in failures:
        log(f"!!! FAILED {f}")
    for c in crashes:
        log(f"!!! CRASHED {c}")
    if shaky:
        log(f"!!! UNRELIABLE (spread over {100 * _bench.SPREAD_LIMIT:.0f}%): "
            + ", ".join(shaky) + ": rerun them (--show-worst/--layers, more --rounds)")
    log(f"sweep took {elapsed:.0f} s")

    worst = worst_results(results, args.show_worst) if args.show_worst else []
    if worst:
        log("")
        log(f"the {len(worst)} lowest ratio(s):")
        w_header, w_body = sweep_table(worst, args.grad)
        log(_bench.format_text(w_header, w_body))

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = {"command": "convtranspose bench " + " ".join(
                    _command_args(args, dims)),
                "seed": args.seed, "dims": dims, "dtype": dt.name, "grad": bool(args.grad),
                "rounds": args.rounds, "threads": threads, "machine": head,
                "summary": summary, "seconds": round(elapsed, 1)}
        md = os.path.join(args.out, "sweep.md")
        with open(md, "w") as f:
            f.write("\n".join(["# convtranspose bench --sweep", "",
                               f"- `{meta['command']}`", f"- {source}",
                               *(f"- {line}" for line in head), "",
                               _bench.format_markdown(header, body), "",
                               *(f"**{line}**  " for line in summary), "",
                               *(f"- {n}" for n in notes + mismatches + failures + crashes),
                               ""]))
        paths = [md]
        js = os.path.join(args.out, "sweep.json")
        with open(js, "w") as f:
            f.write(dump_json(results_json(results, meta)))
        paths.append(js)
        if worst:
            wj = os.path.join(args.out, "worst.json")
            with open(wj, "w") as f:
                f.write(dump_json(results_json(worst, meta)))
            paths.append(wj)
        png = os.path.join(args.out, "sweep.png")
        title = (f"{len(results)} random layers, {dt.name}, "
                 + ("both gradients vs PyTorch's backward" if args.grad
                    else "forward vs the faster of PyTorch/ONNX Runtime"))
        if write_sweep_chart(results, png, title, args.grad):
            paths.append(png)
        else:
            log("matplotlib is not installed: no chart (pip install matplotlib)")
        for p in paths:
            log(f"wrote {p}")
    return 1 if mismatches or failures else 0


# --- timing in a worker process (see _isolate) ------------------------------------------

CRASHED = "n/a (crashed)"


@dataclass(frozen=True)
class LayerTask:
    """One layer to time in the worker, against `peers`; `seed` orders its rounds."""

    layer: Workload
    peers: tuple[str, ...]
    dtype: str
    rounds: int
    threads: int | None
    grad: bool
    seed: str


def _timing_setup(grad: bool, threads: int | None) -> dict[str, str]:
    """The worker's start: the peers it finds, with the threads applied."""
    return _bench.setup_peers(argparse.Namespace(grad=grad, mlx=False), threads)[0]


def _time_layer(found: dict[str, str], task: LayerTask, log: Callable[[str], None]
                ) -> BenchRow:
    return _bench.bench_workload(
        task.layer, [p for p in task.peers if p in found], resolve_dtype(task.dtype),
        task.rounds, task.threads, task.grad, log=log, parts=False,
        rng=random.Random(task.seed), check64=True)


def _time_in_worker(worker: Worker, task: LayerTask, log: Callable[[str], None]) -> BenchRow:
    """The layer's row from the worker process. Where the worker dies, each contender runs
    again in a fresh one to find which crashed it: ours alone (if ours crashes, the row
    is our failure), then each peer beside ours; the layer is then timed with the peers
    that did not crash, the others marked CRASHED."""
    try:
        return worker.run(task)
    except WorkerDied as exc:
        log(f"  !!! {task.layer.title}: {exc} while timing it; finding which contender")
    wl = task.layer
    try:
        alone = worker.run(replace(task, peers=()))
    except WorkerDied as exc:
        row = BenchRow(wl.title, wl.useful_flops * (2 if task.grad else 1), None)
        row.failure = f"convtranspose crashed the process ({describe_exit(exc.exitcode)})"
        log(f"  !!! {wl.title}: {row.failure}")
        return row
    crashed = []
    for peer in task.peers:
        try:
            worker.run(replace(task, peers=(peer,)))
        except WorkerDied as exc:
            log(f"  !!! {wl.title}: {peer} crashed the process ({describe_exit(exc.exitcode)})")
            crashed.append(peer)
    row, survivors = alone, tuple(p for p in task.peers if p not in crashed)
    if survivors:
        try:
            row = worker.run(replace(task, peers=survivors))
        except WorkerDied:  # they crashed it again together: ours alone stands
            crashed = list(task.peers)
    for peer in crashed:
        row.peers[peer] = _bench.PeerTiming(note=CRASHED)
    return row


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


def _command_args(args: argparse.Namespace, dims: Sequence[int]) -> list[str]:
    """The command line that redoes this run (for sweep.md and sweep.json)."""
    out = [f"--layers {args.layers}"] if args.layers else []
    if args.sweep:
        out.append(f"--sweep {args.sweep}")
    if not args.layers:
        out += [f"--seed {args.seed}", f"--dims {','.join(map(str, dims))}"]
    out += [f"--rounds {args.rounds}"] + (["--grad"] if args.grad else [])
    if args.dtype != "float32":
        out.append(f"--dtype {args.dtype}")
    if args.threads:
        out.append(f"--threads {args.threads}")
    return out
