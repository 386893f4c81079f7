"""`convtranspose demo`: a small 3-D decoder on a synthetic volume, layer by layer.

A deterministic 8^3 volume with a few channels (Gaussian blobs, a sphere shell, a gradient,
a wave) goes through five `conv_transpose3d` layers with ReLUs between them, 8^3 -> 64^3
and 4 -> 128 -> 64 -> 32 -> 16 -> 1 channels, mixing the common decoder settings (k3s1p1,
k2s2, k4s2p1, k3s2p1op1). Each layer's shapes, settings, time and useful GFLOP/s are printed,
beside PyTorch's time for the same layer when PyTorch is installed. With matplotlib, a PNG of
orthogonal slices through the centre of the input and of the output is written.

The weights are fixed random numbers around an interpolation kernel, so the output is a
smooth, recognisable upsampling of the input rather than noise: a picture that shows at a
glance that the layers compute something sensible.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

import convtranspose


@dataclass(frozen=True)
class Layer:
    name: str
    c_in: int
    c_out: int
    kernel: int
    stride: int
    padding: int = 0
    output_padding: int = 0
    relu: bool = True

    @property
    def settings(self) -> dict[str, int]:
        return {"stride": self.stride, "padding": self.padding,
                "output_padding": self.output_padding}

    @property
    def describe(self) -> str:
        return f"k{self.kernel} s{self.stride} p{self.padding} op{self.output_padding}"


SIZE = 8          # the input volume is SIZE^3
IN_CHANNELS = 4
DECODER = (
    Layer("stem", IN_CHANNELS, 128, 3, 1, 1),      # 8^3, lift to a realistic width
    Layer("up1", 128, 64, 2, 2),                   # 8^3 -> 16^3 (U-Net style)
    Layer("up2", 64, 32, 4, 2, 1),                 # 16^3 -> 32^3 (DCGAN style)
    Layer("up3", 32, 16, 3, 2, 1, 1),              # 32^3 -> 64^3 (VAE style)
    Layer("head", 16, 1, 3, 1, 1, relu=False),     # 64^3, one output channel
)


CHANNEL_EMPHASIS = np.array([1.0, 0.3, 0.1, 0.1])


def synthetic_volume(seed: int = 0, size: int = SIZE) -> np.ndarray:
    """(1, size, size, size, 4) float32: Gaussian blobs, a sphere shell, a gradient, a wave."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1.0, 1.0, size),) * 3, indexing="ij")
    blobs = np.zeros_like(z)
    for _ in range(3):
        c = rng.uniform(-0.6, 0.6, 3)
        width = rng.uniform(0.18, 0.3)
        blobs += rng.uniform(0.6, 1.0) * np.exp(
            -((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * width**2))
    r = np.sqrt(z**2 + y**2 + x**2)
    shell = np.exp(-((r - 0.7) ** 2) / (2 * 0.15**2))
    gradient = (z + 1.0) / 2.0
    wave = 0.5 + 0.5 * np.sin(3.0 * x + rng.uniform(0, 2 * np.pi)) * np.cos(2.0 * y)
    vol = np.stack([blobs, shell, gradient, wave], axis=-1)[None]
    return vol.astype(np.float32)


def interpolation_taps(kernel: int, stride: int) -> np.ndarray:
    """A 1-D tent of `kernel` taps whose taps feeding each output phase sum to one, so that
    a layer built on it upsamples smoothly and keeps the signal's scale."""
    centre = (kernel - 1) / 2
    taps = 1.0 - np.abs(np.arange(kernel) - centre) / (centre + 1.0)
    for phase in range(stride):
        taps[phase::stride] /= taps[phase::stride].sum()
    return taps


def decoder_weights(seed: int = 0, layers: tuple[Layer, ...] = DECODER) -> list[np.ndarray]:
    """Fixed random weights (C_out, k, k, k, C_in): an interpolation kernel in space times
    a random, mostly positive channel mixing whose rows sum to about one, with 20% noise."""
    rng = np.random.default_rng(seed + 1)
    weights = []
    for layer in layers:
        t = interpolation_taps(layer.kernel, layer.stride)
        space = t[:, None, None] * t[None, :, None] * t[None, None, :]
        mix = (2.0 * rng.uniform(size=(layer.c_out, layer.c_in))
               + 0.5 * rng.standard_normal((layer.c_out, layer.c_in))) / layer.c_in
        if layer is layers[0] and layer.c_in == IN_CHANNELS:
            # Let the blobs (channel 0, the one plotted) lead, so input and output compare.
            mix *= CHANNEL_EMPHASIS * (IN_CHANNELS / CHANNEL_EMPHASIS.sum())
        w = mix[:, None, None, None, :] * space[None, :, :, :, None]
        w = w * (1.0 + 0.2 * rng.standard_normal(w.shape))
        weights.append(w.astype(np.float32))
    return weights


def useful_flops(x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> int:
    n, *spatial, c_in = x_shape
    c_out, *kernel, _ = w_shape
    return 2 * n * math.prod(spatial) * c_in * c_out * math.prod(kernel)


def _median_ms(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _torch_layer(x: np.ndarray, w: np.ndarray, layer: Layer) -> dict[str, Any]:
    """Zero-argument callables running the same layer in PyTorch, in its two layouts: NCDHW
    and channels_last_3d (a zero-copy view of our channels-last activations); {} without
    PyTorch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return {}
    x_cl = torch.from_numpy(x).permute(0, 4, 1, 2, 3)
    w_t = torch.from_numpy(convtranspose.weight_to_torch(w))
    calls = {}
    for name, fmt in (("ncdhw", torch.contiguous_format), ("cl", torch.channels_last_3d)):
        xt, wt = x_cl.contiguous(memory_format=fmt), w_t.contiguous(memory_format=fmt)

        def call(xt=xt, wt=wt):
            with torch.no_grad():
                return F.conv_transpose3d(xt, wt, **layer.settings)

        calls[name] = call
    return calls


def run_decoder(x: np.ndarray, weights: list[np.ndarray], layers: tuple[Layer, ...] = DECODER,
                repeat: int = 3, with_torch: bool = True) -> tuple[np.ndarray, list[dict]]:
    """Run the decoder; returns the output and one record per layer (shapes, times...)."""
    records = []
    for layer, w in zip(layers, weights):
        y = convtranspose.conv_transpose3d(x, w, **layer.settings)  # warm-up and the result
        ours_ms = _median_ms(lambda x=x, w=w, layer=layer: convtranspose.conv_transpose3d(
            x, w, **layer.settings), repeat)
        rec = {"layer": layer, "in_shape": x.shape, "out_shape": y.shape,
               "flops": useful_flops(x.shape, w.shape), "ours_ms": ours_ms,
               "torch_ms": None, "torch_err": None}
        for torch_call in (_torch_layer(x, w, layer) if with_torch else {}).values():
            ref = torch_call().permute(0, 2, 3, 4, 1).numpy()  # also PyTorch's warm-up
            err = float(np.abs(ref - y).max() / max(np.abs(y).max(), 1e-30))
            ms = _median_ms(torch_call, repeat)
            rec["torch_err"] = max(err, rec["torch_err"] or 0.0)
            rec["torch_ms"] = ms if rec["torch_ms"] is None else min(ms, rec["torch_ms"])
        if layer.relu:
            np.maximum(y, 0, out=y)  # y is our fresh result: in place is safe
        records.append(rec)
        x = y
    return x, records


def _shape(s: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in s)


def format_records(records: list[dict]) -> str:
    """The per-layer table and the total line."""
    has_torch = any(r["torch_ms"] is not None for r in records)
    header = ["layer", "input (N,D,H,W,C)", "output", "settings", "GFLOP", "ours ms", "GFLOP/s"]
    if has_torch:
        header += ["torch ms", "torch/ours"]  # the faster PyTorch layout
    rows = []
    for r in records:
        row = [r["layer"].name, _shape(r["in_shape"]), _shape(r["out_shape"]),
               r["layer"].describe, f"{r['flops'] / 1e9:.3f}", f"{r['ours_ms']:.2f}",
               f"{r['flops'] / (r['ours_ms'] * 1e6):.1f}"]
        if has_torch:
            t = r["torch_ms"]
            row += ["-" if t is None else f"{t:.2f}",
                    "-" if t is None else f"{t / r['ours_ms']:.2f}"]
        rows.append(row)
    flops = sum(r["flops"] for r in records)
    ours = sum(r["ours_ms"] for r in records)
    total = ["total", "", "", "", f"{flops / 1e9:.3f}", f"{ours:.2f}",
             f"{flops / (ours * 1e6):.1f}"]
    if has_torch:
        torch_total = (sum(r["torch_ms"] for r in records)
                       if all(r["torch_ms"] is not None for r in records) else None)
        total += ["-" if torch_total is None else f"{torch_total:.2f}",
                  "-" if torch_total is None else f"{torch_total / ours:.2f}"]
    rows.append(total)
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(line, widths))).rstrip()
             for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_slices(volume_in: np.ndarray, volume_out: np.ndarray, path: str) -> bool:
    """PNG of XY/XZ/YZ slices through the centre of the input's first channel (top row) and
    of the output (bottom row), creating its folder; False, and no folder, when matplotlib
    is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, axes = plt.subplots(2, 3, figsize=(10.5, 7.2), dpi=100, constrained_layout=True)
    vols = [(volume_in[0, ..., 0], "input, channel 0", "nearest", "input value (channel 0)"),
            (volume_out[0, ..., 0], "decoder output", "nearest", "output value")]
    for row, (vol, label, interp, unit) in enumerate(vols):
        d, h, w = vol.shape
        planes = [(vol[d // 2], f"XY (z = {d // 2})", "x", "y"),
                  (vol[:, h // 2, :], f"XZ (y = {h // 2})", "x", "z"),
                  (vol[:, :, w // 2], f"YZ (x = {w // 2})", "y", "z")]
        lo, hi = float(vol.min()), float(vol.max())
        for col, (plane, name, xl, yl) in enumerate(planes):
            ax = axes[row, col]
            im = ax.imshow(plane, origin="lower", cmap="magma", vmin=lo, vmax=hi,
                           interpolation=interp, extent=(0, 1, 0, 1))
            ax.set_title(f"{label} {_shape(vol.shape)}: {name}", fontsize=9)
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=axes[row, :].tolist(), shrink=0.85, label=unit)
    fig.suptitle("convtranspose demo: synthetic 8^3 volume through a 5-layer "
                 "conv_transpose3d decoder")
    fig.savefig(path)
    plt.close(fig)
    return True


def kernel_line() -> str:
    """Which kernel runs the layers; without the compiled one, what that costs and the fix
    (an install without a C++ compiler succeeds silently)."""
    isa = convtranspose.native_isa()
    if isa is not None:
        return f"kernel: compiled ({isa})"
    return ("kernel: NumPy/BLAS fallback -- the compiled kernel (convtranspose._native) was "
            "not built, as no C++ compiler was found at install; this demo measured 1.8x "
            "(AVX2) to 3.9x (AVX-512) slower without it (docs/PERFORMANCE.md). Reinstall "
            "with g++ or clang++ and Python's headers to get it")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="run a small 3-D decoder on a synthetic volume and plot slices",
        description="Upsample a synthetic 8^3 volume to 64^3 through five conv_transpose3d "
                    "layers; print per-layer times (beside PyTorch's when installed) and "
                    "write a PNG of orthogonal slices.")
    p.add_argument("--out", metavar="DIR", default="./convtranspose-demo",
                   help="folder for demo.png (default ./convtranspose-demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the volume and the weights")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed calls per layer, median reported (default 3)")
    p.add_argument("--no-torch", action="store_true", help="do not time PyTorch beside us")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.repeat < 1:
        print(f"convtranspose demo: '--repeat' must be >= 1, got {args.repeat}")
        return 2
    x = synthetic_volume(args.seed)
    weights = decoder_weights(args.seed)
    print(f"convtranspose {convtranspose.__version__} demo: a {len(DECODER)}-layer 3-D decoder "
          f"on a synthetic {SIZE}^3 volume with {IN_CHANNELS} channels (seed {args.seed}), "
          f"float32, {convtranspose.get_num_threads()} thread(s); median of {args.repeat} "
          f"call(s) per layer")
    print(kernel_line())
    t0 = time.perf_counter()
    y, records = run_decoder(x, weights, repeat=args.repeat, with_torch=not args.no_torch)
    print(format_records(records))
    errs = [r["torch_err"] for r in records if r["torch_err"] is not None]
    if errs:
        print("torch ms: the faster of PyTorch's NCDHW and channels_last_3d layouts; "
              "torch/ours > 1 means we are faster")
        print(f"PyTorch agrees with every layer: max relative difference "
              f"{max(errs):.1e}" if max(errs) < 1e-3 else
              f"!!! PyTorch disagrees: max relative difference {max(errs):.1e}")
    elif not args.no_torch:
        print("PyTorch is not installed: no comparison (pip install torch)")
    print(f"output {_shape(y.shape)}: min {y.min():.3f}, max {y.max():.3f}, "
          f"mean {y.mean():.3f}; demo ran in {time.perf_counter() - t0:.1f} s")
    path = os.path.join(args.out, "demo.png")
    if write_slices(x, y, path):
        print(f"wrote {path}")
    else:
        print("matplotlib is not installed: no picture (pip install matplotlib)")
    return 0 if not errs or max(errs) < 1e-3 else 1
