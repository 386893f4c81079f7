"""`convtranspose bench`: ours against every installed peer, side by side in one process.

For each workload (W1-W9, defined in `_workloads.py`; or the random layers of `--sweep`,
`_sweep.py`) every implementation is first run once and its output compared with ours (a
mismatch is reported loudly and its ratio left out), warmed up, then timed round by round
(`time_runners`: bursts of >= 20 ms after pauses of >= 60 ms, a new random order each
round) so that drifts of a shared machine hit everyone alike; a peer far slower than ours
(MLX) runs last in each round and a cooldown follows it. We report medians, and flag a row
whose samples spread too far to trust. Peers get their best native layout: PyTorch the
faster of NC... and channels_last(_3d) (a zero-copy view of our channels-last array), ONNX
Runtime NC..., MLX channels last. This machine's sgemm peak (NumPy float32 matmul) is
measured in the same run (W1-W9).

The table and the Markdown are built by small pure functions (`table_cells`, `format_text`,
`format_markdown`) from `BenchRow` records, so they can be tested from given timings.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import convtranspose

from ._api import spec_for
from ._arrays import from_framework, mlx_to_numpy
from ._vjp import vjp_arrays
from ._weights import weight_from_torch, weight_to_torch
from ._workloads import DTYPES, Workload, make_arrays, make_cotangent, resolve_dtype
from ._workloads import select_workloads as _select

TORCH, ORT, MLX = "PyTorch", "ONNX Runtime", "MLX"
# The peers whose faster one sets the target ratio (issue 3): MLX is timed only on request.
BEST_OF = (TORCH, ORT)
SHORT = {TORCH: "torch", ORT: "ort", MLX: "mlx"}
# Output agreement, as max|peer - ours| / max|ours|: about rtol 1e-3 scaled, looser for
# half precisions whose results are rounded to 8 or 11 significant bits.
# Fair timing (issue 19), for W1-W9 and the sweep alike: each sample is a burst of
# back-to-back calls lasting at least SAMPLE_MS; before each burst a pause of at least
# MIN_PAUSE_S that lasts on until this process is idle (settle), so that no contender pays
# for another's spinning threads; the contenders run in a new random order every round
# (round_order); we report medians.
SAMPLE_MS = 20.0
MAX_BURST = 1000  # calls in a burst at most
# OpenMP/ORT/BLAS pools keep spinning a while after a call, and a sample taken meanwhile
# shares the cores with them: ONNX Runtime's spun about one core for 30 ms on W3, and in a
# fixed cyclic order the runner after it (ours) paid up to 30%.
MIN_PAUSE_S = 0.06
PAUSE_S = 0.005         # one further look at the process's CPU use
IDLE_SHARE = 0.05       # of one core: below this, the pools are parked
MAX_SETTLE_S = 0.5
# A peer this many times slower than ours (MLX: ~100x) is "slow": it runs last in every round
# and a cooldown follows it. In a plain rotation the runner after MLX's second-long call was
# ours in most rounds, and ours' W5 samples then spread 9.5-15 ms (median 12.7) against
# 9.6 ms without MLX in the run; whatever the cause (host throttling after a long burst, its
# threads), no fast runner should be the one that pays for it.
SLOW_FACTOR = 10.0
SLOW_MIN_MS = 100.0  # ... and this long a call: a 10 ms peer call needs no 1 s cooldown
COOLDOWN_S = 1.0
# A contender whose samples spread more than this (interquartile range / median) makes its
# row unreliable: the row is marked and a warning printed (issue 24: one peer's outlier
# once moved a geomean from ~2x to 12x unnoticed).
SPREAD_LIMIT = 0.25
TOLERANCE = {"float64": 1e-6, "float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}


# --------------------------------------------------------------------------------------------
# Results and their presentation (pure, testable)


@dataclass
class PeerTiming:
    """One peer on one workload: a median time, or why there is none."""

    ms: float | None = None
    note: str = ""            # shown instead of a time: "n/a (groups in 3-D)", ...
    variant: str = ""         # which of the peer's layouts was faster ("cl", "ncdhw")
    mismatch: bool = False    # its output differed from ours: never counted in a ratio
    error: float | None = None  # max|peer - ours| / max|ours|


@dataclass
class BenchRow:
    name: str
    flops: int
    ours_ms: float | None
    workspace_bytes: int | None = None
    peers: dict[str, PeerTiming] = field(default_factory=dict)
    failure: str = ""  # our own call raised: nothing else is timed for this workload
    # Gradients: our medians of OUR_PARTS (the forward, each gradient alone), in ms.
    parts: dict[str, float] = field(default_factory=dict)
    # Each counted contender's samples' spread (IQR/median), by "ours" or "peer (variant)".
    spread: dict[str, float | None] = field(default_factory=dict)
    error: float | None = None  # ours against our float64 result (the sweep)


def unreliable(row: BenchRow) -> dict[str, float]:
    """The contenders of a row whose samples spread beyond SPREAD_LIMIT."""
    return {who: sp for who, sp in row.spread.items() if sp is not None and sp > SPREAD_LIMIT}


UNRELIABLE = "!"  # after a ratio: flagged(row)


def flagged(row: BenchRow, best_of: Sequence[str] = BEST_OF) -> bool:
    """Whether the row's ratio against the faster peer is unreliable: ours or one of
    `best_of` spread beyond SPREAD_LIMIT."""
    return any(who == "ours" or who.split(" (")[0] in best_of for who in unreliable(row))


def ratio(peer: PeerTiming | None, ours_ms: float | None) -> float | None:
    """peer_ms / our_ms (> 1: we are faster); None when either is missing or wrong."""
    if peer is None or peer.ms is None or peer.mismatch or not ours_ms:
        return None
    return peer.ms / ours_ms


def best_ratio(row: BenchRow, best_of: Sequence[str] = BEST_OF) -> float | None:
    """The ratio against the faster of the given peers (the smallest ratio)."""
    ratios = [r for r in (ratio(row.peers.get(p), row.ours_ms) for p in best_of)
              if r is not None]
    return min(ratios) if ratios else None


def geomean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and v > 0]
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def gflops(flops: int, ms: float | None) -> float | None:
    return None if not ms else flops / (ms * 1e6)


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def _fmt_pct(gf: float | None, peak: float | None) -> str:
    if gf is None or not peak:
        return "-"
    pct = 100 * gf / peak
    return f"{pct:.1f}%" if pct < 10 else f"{pct:.0f}%"


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


# Gradients: what of ours is also timed alone (`our_part_runners`), the forward first.
OUR_PARTS = ("forward", "grad_input", "grad_weight")


def _part_cells(parts: dict[str, float]) -> list[str]:
    """The forward's ms, then each gradient's ms with its ratio to the forward's."""
    fwd = parts.get(OUR_PARTS[0])
    cells = [_fmt_ms(fwd)]
    for name in OUR_PARTS[1:]:
        ms = parts.get(name)
        cells.append("-" if ms is None else _fmt_ms(ms) + (
            f" ({ms / fwd:.2f})" if fwd else ""))
    return cells


def table_cells(rows: Sequence[BenchRow], peers: Sequence[str], peak_gflops: float | None,
                best_of: Sequence[str] = BEST_OF) -> tuple[list[str], list[list[str]]]:
    """Header and body of the results table, geomean row last.

    Columns: workload, our ms, useful GFLOP/s, % of sgemm peak, then per peer its ms and
    the ratio peer_ms / our_ms, then the ratio against the faster of `best_of`, then our
    planned workspace.
    """
    best_label = "x best(" + "/".join(SHORT.get(p, p) for p in best_of) + ")"
    header = ["workload", "ours ms", "GFLOP/s", "% peak"]
    for p in peers:
        header += [f"{p} ms", f"x {SHORT.get(p, p)}"]
    # Gradients: each one's time against the forward's, in place of the workspace (the
    # planner's figure is the forward's).
    with_parts = any(row.parts for row in rows)
    header += [best_label] + ([f"{OUR_PARTS[0]} ms"] + [f"{n} ms (x fwd)" for n in OUR_PARTS[1:]]
                              if with_parts else ["workspace MiB"])
    body = []
    for row in rows:
        gf = gflops(row.flops, row.ours_ms)
        cells = [row.name, "FAILED" if row.failure else _fmt_ms(row.ours_ms),
                 "-" if gf is None else f"{gf:.1f}",
                 _fmt_pct(gf, peak_gflops)]
        for p in peers:
            t = row.peers.get(p)
            if t is None or t.ms is None:
                note = t.note if t is not None and t.note else "n/a"
                cells += [note, "n/a"]
                continue
            ms = _fmt_ms(t.ms) + (f" ({t.variant})" if t.variant else "")
            cells += [ms, "MISMATCH" if t.mismatch else _fmt_ratio(ratio(t, row.ours_ms))]
        cells.append(_fmt_ratio(best_ratio(row, best_of))
                     + (UNRELIABLE if flagged(row, best_of) else ""))
        if with_parts:
            cells += _part_cells(row.parts)
        else:
            cells.append("-" if row.workspace_bytes is None
                         else f"{row.workspace_bytes / 2**20:.1f}")
        body.append(cells)
    gm = ["geomean", "", "", ""]
    for p in peers:
        gm += ["", _fmt_ratio(geomean([ratio(r.peers.get(p), r.ours_ms) for r in rows]))]
    gm += [_fmt_ratio(geomean([best_ratio(r, best_of) for r in rows]))]
    gm += [""] * (3 if with_parts else 1)
    body.append(gm)
    return header, body


def format_text(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A plain-text table with aligned columns (text left, numbers right)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]

    def line(cells: Sequence[str]) -> str:
        out = [str(cells[0]).ljust(widths[0])]
        out += [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def format_markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """The same table as GitHub Markdown (numbers right-aligned)."""
    def esc(c: str) -> str:
        return str(c).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def markdown_report(header: Sequence[str], body: Sequence[Sequence[str]],
                    meta: Sequence[str], notes: Sequence[str] = ()) -> str:
    """bench.md: what ran where, the table, and the notes (mismatches, missing peers)."""
    parts = ["# convtranspose bench", ""]
    parts += [f"- {m}" for m in meta]
    parts += ["", format_markdown(header, body), ""]
    if notes:
        parts += [f"- {n}" for n in notes] + [""]
    return "\n".join(parts)


def write_chart(rows: Sequence[BenchRow], peers: Sequence[str], path: str,
                peak_gflops: float | None = None, title: str = "") -> bool:
    """Grouped bars of useful GFLOP/s per workload per implementation; False without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    impls = ["convtranspose", *peers]
    values = {name: [] for name in impls}
    missing = {name: [] for name in impls}  # what to write where a bar is absent
    for row in rows:
        values["convtranspose"].append(gflops(row.flops, row.ours_ms) or 0.0)
        missing["convtranspose"].append("failed")
        for p in peers:
            t = row.peers.get(p)
            ok = t is not None and t.ms is not None and not t.mismatch
            values[p].append(gflops(row.flops, t.ms) if ok else 0.0)
            missing[p].append("MISMATCH" if t is not None and t.mismatch else "n/a")
    n = len(impls)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.2), dpi=110)
    xs = np.arange(len(rows))
    positive = [v for vals in values.values() for v in vals if v > 0]
    top = max([peak_gflops or 0.0, *positive, 1e-3])
    log = MLX in peers  # MLX sits two orders of magnitude below: only a log axis shows both
    floor = min(positive, default=1.0) / 3 if log else 0.0
    for i, name in enumerate(impls):
        pos = xs + (i - (n - 1) / 2) * width
        ax.bar(pos, values[name], width, label=name)
        for x, v, why in zip(pos, values[name], missing[name]):
            if v <= 0:  # not run or wrong: say so rather than draw nothing
                ax.text(x, floor if log else 0.0, why, rotation=90, ha="center",
                        va="bottom", fontsize=7, color="0.4")
    if peak_gflops:
        ax.axhline(peak_gflops, color="0.3", ls="--", lw=1)
        ax.text(len(rows) - 0.5, peak_gflops, f" sgemm peak {peak_gflops:.0f}",
                va="bottom", ha="right", fontsize=8, color="0.3")
    if log:
        ax.set_yscale("log")
        ax.set_ylim(floor, top * 8)  # head room for the legend
    else:
        ax.set_ylim(0, 1.2 * top)
    ax.set_xticks(xs)
    ax.set_xticklabels([r.name.replace(" ", "\n", 1) for r in rows], fontsize=8)
    ax.set_ylabel("useful GFLOP/s (higher is better)")
    ax.set_title(title or "conv_transpose3d, useful GFLOP/s")
    ax.legend(fontsize=8, ncols=min(n, 4), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# Conversions between our channels-last layout and the peers' layouts (weights: the
# library's own weight_to_torch/weight_from_torch; tensors to NumPy: _arrays)


def to_channels_first(x: np.ndarray) -> np.ndarray:
    """(N, *spatial, C) -> contiguous (N, C, *spatial)."""
    return np.ascontiguousarray(np.moveaxis(x, -1, 1))


def to_channels_last(x: np.ndarray) -> np.ndarray:
    """(N, C, *spatial) -> (N, *spatial, C) view."""
    return np.moveaxis(x, 1, -1)


def onnx_conv_transpose_model(input_shape_ncdhw: Sequence[int], weight_torch: np.ndarray,
                              stride: Sequence[int], padding: Sequence[int],
                              dilation: Sequence[int], output_padding: Sequence[int],
                              groups: int, opset: int = 17) -> Any:
    """A one-node ONNX ConvTranspose model computing our operator on NCDHW input `X`.

    ONNX's output size is stride*(in-1) + output_padding + dilation*(k-1) + 1 - pad_begin -
    pad_end, with output_padding added at the end: MLX's `padding` is the same pad at both
    ends of each axis. The weight (PyTorch layout) is an initializer, so only X is fed.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
            np.dtype(np.float64): TensorProto.DOUBLE}.get(weight_torch.dtype)
    if elem is None:
        raise TypeError(f"ONNX model: no ONNX element type for {weight_torch.dtype}")
    pads = [int(p) for p in padding] * 2
    out_shape = [int(input_shape_ncdhw[0]), int(weight_torch.shape[1]) * int(groups)]
    out_shape += [s * (i - 1) + o + d * (k - 1) + 1 - 2 * p for i, k, s, p, d, o in zip(
        input_shape_ncdhw[2:], weight_torch.shape[2:], stride, padding, dilation,
        output_padding)]
    node = helper.make_node(
        "ConvTranspose", ["X", "W"], ["Y"], kernel_shape=list(weight_torch.shape[2:]),
        strides=[int(s) for s in stride], pads=pads, dilations=[int(d) for d in dilation],
        output_padding=[int(o) for o in output_padding], group=int(groups))
    graph = helper.make_graph(
        [node], "conv_transpose",
        [helper.make_tensor_value_info("X", elem, [int(s) for s in input_shape_ncdhw])],
        [helper.make_tensor_value_info("Y", elem, out_shape)],
        initializer=[numpy_helper.from_array(weight_torch, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 9)  # readable by older onnxruntime releases
    onnx.checker.check_model(model)
    return model


def onnx_session(model: Any, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: a refused setting becomes our 'n/a'
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = int(threads or 0)  # 0: ORT picks every core
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max|got - ref| / max|ref|, walked slice by slice so that strided views (a peer's
    NCDHW result seen channels last) are never copied whole."""
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        return math.inf
    wide = np.float64 if np.float64 in (got.dtype, ref.dtype) else np.float32
    lead = got.shape[:2] if got.ndim > 2 else ()
    diff = scale = 0.0
    for idx in np.ndindex(*lead):
        a, b = got[idx].astype(wide), ref[idx].astype(wide)
        d = np.abs(a - b)
        if not np.all(np.isfinite(d)):
            return math.inf
        diff = max(diff, float(d.max(initial=0.0)))
        scale = max(scale, float(np.abs(b).max(initial=0.0)))
    return diff / scale if scale > 0 else diff


# --------------------------------------------------------------------------------------------
# Peers: each prepares one or more runnable variants of a workload, or says why it can't.


@dataclass
class Runner:
    """A prepared call: `call()` runs it (timed); `to_ours(result)` converts its result to our
    layout for the check (untimed). For gradients a result is (grad_input, grad_weight)."""

    call: Callable[[], Any]
    to_ours: Callable[[Any], Any]


class Unavailable(Exception):
    """A peer cannot run this workload (dtype, setting, missing feature): shown as n/a.
    args: (the short table note, an optional longer reason for the log)."""


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip()
    # ORT puts its status in front of the message and colours its log lines: keep the gist.
    text = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {text[:limit]}"


def _np_to_torch(torch: Any, a: np.ndarray) -> Any:
    if a.dtype.name == "bfloat16":  # torch.from_numpy does not know ml_dtypes
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# PyTorch's name of its contiguous layout, by spatial axes (the 'cl' variant is its channels
# last, a zero-copy view of our array; 1-D has none).
TORCH_FIRST = {1: "ncw", 2: "nchw", 3: "ncdhw"}


def torch_runners(wl: Workload, x: np.ndarray, w: np.ndarray, g: np.ndarray | None
                  ) -> dict[str, Runner]:
    """PyTorch in both layouts: contiguous ('ncdhw', 'nchw', 'ncw') and, in 2-D and 3-D,
    'cl' (channels_last(_3d), a zero-copy permuted view of our array)."""
    import torch
    import torch.nn.functional as F

    kw = dict(stride=wl.stride, padding=wl.padding, output_padding=wl.output_padding,
              groups=wl.groups, dilation=wl.dilation)
    if min(wl.padding) < 0 or any(o >= max(s, d) for o, s, d in
                                  zip(wl.output_padding, wl.stride, wl.dilation)):
        raise Unavailable("n/a (setting)")
    nd = wl.ndim
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    x_cl = _np_to_torch(torch, x).permute(0, nd + 1, *range(1, nd + 1))
    wt = _np_to_torch(torch, weight_to_torch(w, wl.groups))
    groups = wl.groups
    formats = [(TORCH_FIRST[nd], torch.contiguous_format)]
    if nd > 1:
        formats.append(("cl", torch.channels_last if nd == 2 else torch.channels_last_3d))
    runners = {}
    for variant, fmt in formats:
        xt = x_cl.contiguous(memory_format=fmt)
        wv = wt.contiguous(memory_format=fmt)
        if g is None:
            def call(xt=xt, wv=wv):
                with torch.no_grad():
                    return conv(xt, wv, **kw)

            runners[variant] = Runner(call, lambda y: np.moveaxis(from_framework(y), 1, -1))
            continue
        xg = xt.detach().clone(memory_format=fmt).requires_grad_(True)
        wg = wv.detach().clone(memory_format=fmt).requires_grad_(True)
        y = conv(xg, wg, **kw)  # forward once; the backward alone is timed
        gt = _np_to_torch(torch, g).permute(0, nd + 1, *range(1, nd + 1)).contiguous(
            memory_format=fmt)

        def call(y=y, xg=xg, wg=wg, gt=gt):
            return torch.autograd.grad(y, (xg, wg), gt, retain_graph=True)

        def to_ours(res):
            gx, gw = res
            return np.moveaxis(from_framework(gx), 1, -1), weight_from_torch(gw, groups)

        runners[variant] = Runner(call, to_ours)
    return runners


def ort_runners(wl: Workload, x: np.ndarray, w: np.ndarray, g: np.ndarray | None,
                threads: int | None) -> dict[str, Runner]:
    if g is not None:
        raise Unavailable("n/a (no grads)")
    if x.dtype.name not in ("float32", "float16"):
        raise Unavailable(f"n/a ({x.dtype.name})")
    if min(wl.padding) < 0 or any(o >= max(s, d) for o, s, d in
                                  zip(wl.output_padding, wl.stride, wl.dilation)):
        raise Unavailable("n/a (setting)")
    xt = to_channels_first(x)
    try:
        model = onnx_conv_transpose_model(xt.shape, weight_to_torch(w, wl.groups),
                                          wl.stride, wl.padding, wl.dilation,
                                          wl.output_padding, wl.groups)
        sess = onnx_session(model, threads)
    except Exception as exc:  # noqa: BLE001 - any refusal of ORT is a per-workload n/a
        raise Unavailable("n/a (refused)", _first_line(exc)) from exc
    feeds = {"X": xt}
    return {"": Runner(lambda: sess.run(None, feeds)[0], to_channels_last)}


def mlx_runners(wl: Workload, x: np.ndarray, w: np.ndarray, g: np.ndarray | None
                ) -> dict[str, Runner]:
    import mlx.core as mx

    if wl.groups != 1 and wl.ndim == 3:
        raise Unavailable("n/a (groups)")  # MLX: "Can only handle groups != 1 in 1D or 2D"
    if x.dtype.name == "float64":
        raise Unavailable("n/a (float64)")

    def to_mx(a: np.ndarray) -> Any:
        if a.dtype.name == "bfloat16":
            return mx.array(a.astype(np.float32)).astype(mx.bfloat16)
        return mx.array(a)

    xm, wm = to_mx(x), to_mx(w)
    one = wl.ndim == 1  # mx.conv_transpose1d takes ints, not tuples
    kw = {k: (v[0] if one else v) for k, v in wl.settings.items() if k != "groups"}
    if wl.groups != 1:
        kw["groups"] = wl.groups
    conv = (mx.conv_transpose1d, mx.conv_transpose2d, mx.conv_transpose3d)[wl.ndim - 1]

    def forward(a, b):
        return conv(a, b, **kw)

    if g is None:
        def call():
            y = forward(xm, wm)
            mx.eval(y)
            return y

        return {"": Runner(call, mlx_to_numpy)}
    gm = to_mx(g)

    def call_vjp():
        _, (gx, gw) = mx.vjp(lambda a, b: forward(a, b), [xm, wm], [gm])
        mx.eval(gx, gw)
        return gx, gw

    return {"": Runner(call_vjp, lambda r: (mlx_to_numpy(r[0]), mlx_to_numpy(r[1])))}


def _ours(ndim: int, vjp: bool = False) -> Callable[..., Any]:
    """convtranspose.conv_transpose{ndim}d(_vjp), looked up at call time (tests patch it)."""
    return getattr(convtranspose, f"conv_transpose{ndim}d{'_vjp' if vjp else ''}")


def mlx_dropin_runners(wl: Workload, x: np.ndarray, w: np.ndarray) -> dict[str, Runner]:
    """Our MLX drop-in (convtranspose.mlx) on mx.arrays, eager and under mx.compile (the
    compiled primitive; eager alone where it is not available), timed beside the rest."""
    import mlx.core as mx

    from . import mlx as ctm

    if x.dtype.name not in ("float32", "float64"):
        raise Unavailable("n/a (dtype)")
    xm, wm = mx.array(x), mx.array(w)

    def forward(a, b):
        return ctm.conv_transpose3d(a, b, **wl.settings)

    def timed(fn):
        def call():
            y = fn(xm, wm)
            mx.eval(y)
            return y
        return Runner(call, np.array)

    out = {"eager": timed(forward)}
    if ctm.extension_error() is None:
        out["compiled"] = timed(mx.compile(forward))
    return out


def ours_runner(wl: Workload, x: np.ndarray, w: np.ndarray, g: np.ndarray | None) -> Runner:
    s = wl.settings
    if g is None:
        fwd = _ours(wl.ndim)
        return Runner(lambda: fwd(x, w, **s), lambda y: y)
    vjp = _ours(wl.ndim, vjp=True)
    args = (s["stride"], s["padding"], s["dilation"], s["output_padding"], s["groups"])
    return Runner(lambda: vjp(x, w, g, *args), lambda r: r)


def our_part_runners(wl: Workload, x: np.ndarray, w: np.ndarray,
                     g: np.ndarray) -> dict[str, Runner]:
    """Gradients: our forward, and each gradient alone (the other not computed), timed
    beside both so that each gradient's cost shows against the forward's."""
    s = wl.settings
    spec = spec_for(wl.ndim, x, w, s["stride"], s["padding"], s["dilation"],
                    s["output_padding"], s["groups"])[0]
    fwd = _ours(wl.ndim)
    return dict(zip(OUR_PARTS, (
        Runner(lambda: fwd(x, w, **s), lambda y: y),
        Runner(lambda: vjp_arrays(spec, x, w, g, need_weight=False)[0], lambda y: y),
        Runner(lambda: vjp_arrays(spec, x, w, g, need_input=False)[1], lambda y: y))))


# --------------------------------------------------------------------------------------------
# Measuring


def round_order(runners: Sequence[Any], slow: Sequence[bool], rng: random.Random
                ) -> list[Any]:
    """The order of one round: the fast runners in a new random order, then the slow ones
    in their given order."""
    fast = [x for x, s in zip(runners, slow) if not s]
    rng.shuffle(fast)
    return fast + [x for x, s in zip(runners, slow) if s]


def settle(min_pause: float = MIN_PAUSE_S) -> float:
    """Pause at least `min_pause` seconds, and on until this process's threads use under
    IDLE_SHARE of a core (at most MAX_SETTLE_S in all); returns the seconds waited."""
    start = time.perf_counter()
    look = max(min_pause, PAUSE_S)
    while True:
        cpu, wall = time.process_time(), time.perf_counter()
        time.sleep(look)
        busy = (time.process_time() - cpu) / max(time.perf_counter() - wall, 1e-9)
        if busy < IDLE_SHARE or time.perf_counter() - start > MAX_SETTLE_S:
            return time.perf_counter() - start
        look = PAUSE_S


def spread(samples: Sequence[float]) -> float | None:
    """Interquartile range / median of a contender's samples; None below two samples."""
    if len(samples) < 2:
        return None
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    med = statistics.median(samples)
    return (q3 - q1) / med if med > 0 else None


def burst_size(est_ms: float) -> int:
    """Calls per sample so that a burst lasts at least SAMPLE_MS (at most MAX_BURST calls)."""
    if not math.isfinite(est_ms):
        return 1
    return max(1, min(MAX_BURST, math.ceil(SAMPLE_MS / max(est_ms, 1e-3))))


def warm_up(call: Callable[[], Any], min_calls: int) -> float:
    """One call, then at least `min_calls` more and on until SAMPLE_MS have passed (at
    most MAX_BURST); the fastest of those after the first, in ms, which sizes the runner's
    bursts. A layer's first call pays for its plan, its packed weight and cold caches: a
    4 -> 48 k5 layer's took 11 ms against 1.4 warm, and bursts sized from it were 2 calls,
    each sample then mostly a cold call after the pause."""
    _timed(call)
    fastest, start = math.inf, time.perf_counter()
    for done in range(MAX_BURST):
        if done >= min_calls and (time.perf_counter() - start) * 1e3 >= SAMPLE_MS:
            break
        fastest = min(fastest, _timed(call))
    return fastest


def time_runners(runners: Sequence[tuple[Any, Runner]], reference: Any, rounds: int,
                 warmup: int = 1, rng: random.Random | None = None,
                 slow_keys: Sequence[Any] = ()) -> dict[Any, list[float]]:
    """The one timing loop of the bench: each runner (key, Runner) is warmed up (warm_up,
    at least `warmup` calls), then timed `rounds` times in bursts (burst_size), a settle()
    before each burst, in a new random order each round. A slow runner runs last in its
    round, a cooldown after it: one in `slow_keys` (not warmed up either), or one
    SLOW_FACTOR times slower than the `reference` key's and of at least SLOW_MIN_MS a
    call. Returns the samples (ms per call) by key."""
    rng = rng or random.Random(0)
    numbers, estimates = {}, {}
    for key, runner in runners:
        est = (warm_up(runner.call, warmup) if warmup > 0 and key not in slow_keys
               else math.inf)
        estimates[key] = est
        numbers[key] = burst_size(est)
    ref_est = estimates[reference]
    slow = [key in slow_keys or estimates[key] > max(SLOW_FACTOR * ref_est, SLOW_MIN_MS)
            for key, _ in runners]
    samples: dict[Any, list[float]] = {key: [] for key, _ in runners}
    for _ in range(max(1, rounds)):
        for (key, runner), is_slow in round_order(list(zip(runners, slow)), slow, rng):
            settle()  # let the previous library's spinning worker threads park
            samples[key].append(_timed(runner.call, numbers[key]))
            if is_slow:
                time.sleep(COOLDOWN_S)
    return samples


def _timed(fn: Callable[[], Any], number: int = 1) -> float:
    """Milliseconds per call, the mean of `number` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(number):
        result = fn()
        del result  # free each output before the next call allocates its own
    return (time.perf_counter() - t0) * 1e3 / number


def sgemm_peak(n: int = 2048, rounds: int = 5, seed: int = 0) -> tuple[float, float]:
    """This machine's float32 GEMM rate through NumPy's BLAS: (median GFLOP/s, median ms)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    np.matmul(a, b, out=c)
    times = [_timed(lambda: np.matmul(a, b, out=c)) for _ in range(max(1, rounds))]
    ms = statistics.median(times)
    return 2 * n**3 / (ms * 1e6), ms


def _compare(got: Any, ref: Any) -> float:
    if isinstance(ref, tuple):
        return max(relative_error(a, b) for a, b in zip(got, ref))
    return relative_error(got, ref)


def bench_workload(wl: Workload, peers: Sequence[str], dtype: Any = np.float32,
                   rounds: int = 7, threads: int | None = None, grad: bool = False,
                   warmup: int = 1, log: Callable[[str], None] = print, parts: bool = True,
                   rng: random.Random | None = None, check64: bool = False) -> BenchRow:
    """Check every peer against ours, then time them interleaved (time_runners); medians
    in ms. `parts`: with `grad`, also time our forward and each gradient alone. `check64`:
    also our error against our own float64 result (row.error)."""
    dt = resolve_dtype(dtype)
    x, w = make_arrays(wl, dt)
    g = make_cotangent(wl, dt) if grad else None
    tol = TOLERANCE[dt.name]
    row = BenchRow(wl.title, wl.useful_flops * (2 if grad else 1), None)
    if not grad:
        try:
            row.workspace_bytes = convtranspose.plan(
                wl.input_shape, wl.weight_shape, **wl.settings, dtype=dt,
                threads=threads).workspace_bytes
        except Exception:  # noqa: BLE001 - a missing workspace figure must not stop the run
            row.workspace_bytes = None

    ours = ours_runner(wl, x, w, g)
    try:
        ref = ours.to_ours(ours.call())  # ours first: the reference, and our warm-up
    except Exception as exc:  # noqa: BLE001 - one broken workload must not hide the others
        row.failure = _first_line(exc)
        log(f"  !!! {wl.title}: convtranspose FAILED: {row.failure}")
        return row
    if check64:
        x64, w64 = x.astype(np.float64), w.astype(np.float64)
        g64 = None if g is None else g.astype(np.float64)
        row.error = _compare(ref, ours_runner(wl, x64, w64, g64).call())
        del x64, w64, g64
    runners: list[tuple[str, str, Runner]] = [("ours", "", ours)]
    if grad and parts:
        runners += [("ours", name, runner)
                    for name, runner in our_part_runners(wl, x, w, g).items()]
    messages = []
    if MLX in peers and g is None:  # our drop-in, timed as "ours-mlx" (logged, not tabled)
        try:
            runners += [("ours-mlx", v, r) for v, r in mlx_dropin_runners(wl, x, w).items()]
        except Unavailable:
            pass
    for peer in peers:
        try:
            if peer == TORCH:
                variants = torch_runners(wl, x, w, g)
            elif peer == ORT:
                variants = ort_runners(wl, x, w, g, threads)
            else:
                variants = mlx_runners(wl, x, w, g)
        except Unavailable as exc:
            row.peers[peer] = PeerTiming(note=exc.args[0])
            if len(exc.args) > 1:
                messages.append(f"{peer}: {exc.args[0]}: {exc.args[1]}")
            continue
        timing = PeerTiming()
        row.peers[peer] = timing
        for variant, runner in variants.items():
            try:
                err = _compare(runner.to_ours(runner.call()), ref)
            except Exception as exc:  # noqa: BLE001 - a peer refusing a call is an n/a
                messages.append(f"{peer}{f' ({variant})' if variant else ''} failed: "
                                f"{_first_line(exc)}")
                continue
            timing.error = err if timing.error is None else max(timing.error, err)
            if not err <= tol:
                timing.mismatch = True
            runners.append((peer, variant, runner))
        if not any(p == peer for p, _, _ in runners):
            timing.note = "n/a (failed)"
        elif timing.mismatch:
            messages.append(f"!!! MISMATCH: {peer} differs from convtranspose on {wl.name}: "
                            f"max|peer - ours| / max|ours| = {timing.error:.2e} > {tol:.0e}")
    del ref
    gc.collect()

    # Warm-up (the check above was the first call of each), then the timed rounds.
    samples = time_runners([((p, v), r) for p, v, r in runners], ("ours", ""), rounds,
                           warmup, rng, slow_keys=[(p, v) for p, v, _ in runners if p == MLX])
    medians = {key: statistics.median(ts) for key, ts in samples.items()}
    row.ours_ms = medians[("ours", "")]
    row.spread = {"ours": spread(samples[("ours", "")])}
    row.parts = {v: ms for (p, v), ms in medians.items() if p == "ours" and v}
    for peer in peers:
        timing = row.peers[peer]
        own = {v: ms for (p, v), ms in medians.items() if p == peer}
        if own:
            variant = min(own, key=own.get)
            timing.ms, timing.variant = own[variant], variant
            row.spread[peer + (f" ({variant})" if variant else "")] = spread(
                samples[(peer, variant)])
    errs = ", ".join(f"{p} {row.peers[p].error:.1e}" for p in peers
                     if row.peers[p].error is not None)
    log(f"  {wl.title}: ours {_fmt_ms(row.ours_ms)} ms"
        + (f"; max rel. difference vs ours: {errs}" if errs else ""))
    dropin = [f"{v} {_fmt_ms(ms)} ms" for (p, v), ms in medians.items() if p == "ours-mlx"]
    if dropin:
        log(f"  {wl.title}: convtranspose.mlx drop-in: " + ", ".join(dropin))
    for m in messages:
        log("  " + m)
    shaky = unreliable(row)
    if shaky:
        log(f"  !!! {wl.title}: samples spread (IQR/median) "
            + ", ".join(f"{who} {100 * sp:.0f}%" for who, sp in shaky.items())
            + f" > {100 * SPREAD_LIMIT:.0f}%: unreliable")
    return row


# --------------------------------------------------------------------------------------------
# The command


PEER_MODULES = {TORCH: ("torch",), ORT: ("onnxruntime", "onnx"), MLX: ("mlx.core",)}


def find_peers(want_mlx: bool) -> tuple[dict[str, str], list[str]]:
    """({installed peer: versions}, [missing peer (reason)])."""
    found, missing = {}, []
    for peer, modules in PEER_MODULES.items():
        if peer == MLX and not want_mlx:
            continue
        try:
            versions = [str(getattr(importlib.import_module(m), "__version__", "?"))
                        for m in modules]
        except Exception as exc:  # noqa: BLE001 - a broken install is as good as missing
            missing.append(f"{peer} ({type(exc).__name__}: {exc})")
            continue
        extra = "".join(f", {m.split('.')[0]} {v}" for m, v in zip(modules[1:], versions[1:]))
        found[peer] = versions[0] + (f" ({extra[2:]})" if extra else "")
    return found, missing


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="time convtranspose against PyTorch, ONNX Runtime (and MLX)",
        description="Time convtranspose.conv_transpose3d on the public workloads W1-W9 "
                    "(or, with --sweep N, on N random 1-D/2-D/3-D layers) against every "
                    "installed peer, interleaved in one process; medians.")
    p.add_argument("--workload", default="all",
                   help="comma-separated workloads, e.g. W1,W3 (default: all of W1-W9)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--rounds", type=_positive_int, default=7,
                   help="timed rounds per implementation, median reported (default 7)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="threads for ours, PyTorch and ONNX Runtime (default: all cores)")
    p.add_argument("--mlx", action="store_true", help="also time MLX's CPU conv_transpose3d "
                   "(slow: seconds per call; W1-W9 only)")
    p.add_argument("--grad", action="store_true",
                   help="time gradients: convtranspose's vjp against PyTorch's backward "
                        "(ONNX Runtime has none)")
    p.add_argument("--sgemm-size", type=_positive_int, default=2048, metavar="N",
                   help="size of the float32 N x N x N matmul measuring the peak (default 2048)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="also write DIR/bench.md (the table) and DIR/bench.png (a chart); "
                        "with --sweep DIR/sweep.md, sweep.png and sweep.json (the layers)")
    sweep = p.add_argument_group(
        "random-layer sweep", "time N random layers drawn from --seed (about 2/3 3-D, 1/4 "
        "2-D, the rest 1-D; 0.05-3 useful GFLOP each) against the faster peer")
    sweep.add_argument("--sweep", type=_positive_int, default=None, metavar="N",
                       help="draw and time N random layers instead of W1-W9")
    sweep.add_argument("--seed", type=int, default=0,
                       help="the sweep's random seed (the same seed draws the same layers; "
                            "default 0)")
    sweep.add_argument("--dims", default="1,2,3", metavar="1,2,3",
                       help="spatial dimensions to draw from (default 1,2,3)")
    sweep.add_argument("--layers", metavar="FILE.json", default=None,
                       help="time the layers of a sweep.json (or worst.json) written by "
                            "--out instead of drawing; with --sweep N only the first N")
    sweep.add_argument("--show-worst", type=_positive_int, default=None, metavar="K",
                       help="list the K layers with the lowest ratio (and, with --out, write "
                            "them to DIR/worst.json for --layers)")
    p.set_defaults(func=run)
    return p


def kernel_text() -> str:
    """The compiled kernel in use, or its absence (issue 24: the slow path must not be
    silent)."""
    isa = convtranspose.native_isa()
    return f"compiled, {isa}" if isa else "none: NumPy fallback (3-4x slower; see README)"


def header_lines(threads: int | None, found: dict[str, str], missing: Sequence[str],
                 mlx_asked: bool | None) -> list[str]:
    """What ran where: machine, kernel, peers (the first lines of W1-W9 and of the sweep)."""
    lines = [f"machine: {_cpu_name()}, {os.cpu_count()} CPU(s); python "
             f"{platform.python_version()}, numpy {np.__version__}; threads: "
             f"{threads or 'default (all cores)'}",
             f"kernel: {kernel_text()}",
             "peers: " + (", ".join(f"{p} {v}" for p, v in found.items()) or "none")
             + ("; MLX not requested (--mlx)" if mlx_asked is False else "")]
    if missing:
        lines.append("missing peers (not timed): " + "; ".join(missing))
    return lines


TIMING_NOTE = (f"Timing: each sample a burst of back-to-back calls of >= {SAMPLE_MS:.0f} ms, "
               f"after a pause of >= {1e3 * MIN_PAUSE_S:.0f} ms until the process is idle; "
               "contenders in a new random order each round; medians. "
               f"{UNRELIABLE} after a ratio: ours or a peer spread more than "
               f"{100 * SPREAD_LIMIT:.0f}% (interquartile range / median) over the rounds: "
               "the ratio is unreliable, rerun it.")


def setup_peers(args: argparse.Namespace, threads: int | None
                ) -> tuple[dict[str, str], list[str]]:
    """The installed peers (ONNX Runtime left out for gradients: it has none), with
    `threads` applied to ours and PyTorch."""
    found, missing = find_peers(getattr(args, "mlx", False))
    if args.grad:
        found.pop(ORT, None)
        missing = [m for m in missing if not m.startswith(ORT)]
    if threads is not None:
        convtranspose.set_num_threads(threads)
        if TORCH in found:
            import torch
            torch.set_num_threads(threads)
    return found, missing


def run(args: argparse.Namespace) -> int:
    if getattr(args, "sweep", None) or getattr(args, "layers", None):
        from ._sweep import run_sweep
        return run_sweep(args)
    try:
        workloads = _select(args.workload)
        dt = resolve_dtype(args.dtype)
    except ValueError as exc:
        print(f"convtranspose bench: {exc}", file=sys.stderr)
        return 2
    if args.grad and not hasattr(convtranspose, "conv_transpose3d_vjp"):
        print("convtranspose bench: grads are unavailable: this convtranspose has no "
              "conv_transpose3d_vjp", file=sys.stderr)
        return 1
    threads = args.threads
    found, missing = setup_peers(args, threads)
    peers = list(found)
    best_of = [p for p in BEST_OF if p in peers] if args.grad else BEST_OF

    print(f"convtranspose {convtranspose.__version__} bench: {len(workloads)} workload(s), "
          f"{dt.name}, {'gradients (vjp), ' if args.grad else ''}median of {args.rounds} "
          f"round(s)")
    for line in header_lines(threads, found, missing, args.mlx):
        print(line)
    size = args.sgemm_size
    sgemm_rounds = max(3, min(args.rounds, 7))
    peak, peak_ms = sgemm_peak(size, rounds=sgemm_rounds)
    print(f"sgemm (numpy float32 matmul {size}^3, median): {peak:.1f} GFLOP/s ({peak_ms:.1f} ms)"
          + (" - BLAS threads are not limited by --threads" if threads else ""))

    rng = random.Random(getattr(args, "seed", 0))
    rows = [bench_workload(wl, peers, dt, args.rounds, threads, args.grad, rng=rng)
            for wl in workloads]
    # Measured again after the workloads: on a shared machine the higher one is the peak.
    peak_end, _ = sgemm_peak(size, rounds=sgemm_rounds)
    print(f"sgemm again after the workloads: {peak_end:.1f} GFLOP/s; peak used for % peak: "
          f"{max(peak, peak_end):.1f} GFLOP/s")
    peak = max(peak, peak_end)
    header, body = table_cells(rows, peers, peak, best_of)
    print()
    print(format_text(header, body))
    notes = [
        "ratio = peer ms / our ms: above 1 we are faster. " + TIMING_NOTE,
        f"useful GFLOP/s = {'2 x ' if args.grad else ''}2*N*prod(in)*C_in*(C_out/groups)*"
        "prod(k) / time: the multiply-adds of the direct sum that touch a real input value, "
        "whatever the algorithm does.",
        f"% peak = useful GFLOP/s as a share of this machine's float32 GEMM rate, measured in "
        f"this run (NumPy matmul {size}^3, the higher of before and after the workloads). "
        "Above 100% means fewer multiply-adds than the direct sum (Winograd: W5, W8) or a "
        "GEMM rate measured low on a busy machine, not a faster multiply-add.",
        "PyTorch: the faster of NCDHW (ncdhw) and channels_last_3d (cl)"
        + ("." if args.grad else "; ONNX Runtime: NCDHW."),
    ]
    mismatches = [f"{r.name}: {p} output differs from ours (rel. error {t.error:.2e})"
                  for r in rows for p, t in r.peers.items() if t.mismatch]
    failures = [f"{r.name}: convtranspose failed: {r.failure}" for r in rows if r.failure]
    shaky = [f"{r.name}: " + ", ".join(f"{who} {100 * sp:.0f}%"
                                       for who, sp in unreliable(r).items())
             for r in rows if unreliable(r)]
    if missing:
        notes.append("missing peers: " + "; ".join(missing))
    notes += ["MISMATCH " + m for m in mismatches] + ["FAILED " + f for f in failures]
    notes += ["UNRELIABLE (spread) " + u for u in shaky]
    for note in notes[:4]:
        print(note)
    for m in mismatches:
        print(f"!!! MISMATCH {m}")
    for f in failures:
        print(f"!!! FAILED {f}")
    for u in shaky:
        print(f"!!! UNRELIABLE {u}: rerun these rows (--workload, more --rounds)")

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = [f"convtranspose {convtranspose.__version__}, {dt.name}"
                f"{', gradients' if args.grad else ''}, median of {args.rounds} rounds",
                f"{_cpu_name()}, {os.cpu_count()} CPU(s), threads: {threads or 'all'}",
                f"kernel: {kernel_text()}",
                "peers: " + (", ".join(f"{p} {v}" for p, v in found.items()) or "none"),
                f"sgemm peak (numpy float32 {size}^3, the higher of before and after): "
                f"{peak:.1f} GFLOP/s"]
        md = os.path.join(args.out, "bench.md")
        with open(md, "w") as f:
            f.write(markdown_report(header, body, meta, notes))
        print(f"wrote {md}")
        png = os.path.join(args.out, "bench.png")
        title = f"conv_transpose3d {dt.name}{' gradients' if args.grad else ''}"
        if write_chart(rows, peers, png, peak, title):
            print(f"wrote {png}")
        else:
            print("matplotlib is not installed: no chart (pip install matplotlib)")
    return 1 if mismatches or failures else 0
