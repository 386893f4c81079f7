"""Draw the figures of docs/COMMON_PITFALLS.md from convtranspose itself.

    python scripts/make_figures.py            # writes docs/figures/*.png
    python scripts/make_figures.py --out DIR  # somewhere else

Checkerboard artifacts: a constant 16x16 image is upsampled to 32x32 three ways
(transposed convolution with kernel 3 / stride 2, with kernel 4 / stride 2, and nearest
resize followed by a stride-1 3x3 convolution), once with uniform weights and once with
random positive weights. A perfect upsampler of a constant image gives a constant image;
every pattern in the pictures is an artifact of the upsampler. The script prints the
distinct interior values that the guide quotes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import convtranspose as ct  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZE = 16  # input side; every method below gives 2 * SIZE
BORDER = 2  # rows/columns next to the edge see fewer taps: leave them out of the stats


def upsample(method: str, image: np.ndarray, weight3: np.ndarray,
             weight4: np.ndarray) -> np.ndarray:
    """`image` (H, W) -> (2H, 2W) with one of the three upsamplers, single channel."""
    x = image[None, :, :, None]
    if method == "k3s2":
        y = ct.conv_transpose2d(x, weight3[None, :, :, None], stride=2, padding=1,
                                output_padding=1)
    elif method == "k4s2":
        y = ct.conv_transpose2d(x, weight4[None, :, :, None], stride=2, padding=1)
    elif method == "resize":
        big = image.repeat(2, axis=0).repeat(2, axis=1)[None, :, :, None]
        # stride 1, padding 1, kernel 3: a size-preserving 3x3 convolution.
        y = ct.conv_transpose2d(big, weight3[None, :, :, None], stride=1, padding=1)
    else:
        raise ValueError(f"unknown method {method!r}")
    return y[0, :, :, 0]


def interior_values(y: np.ndarray) -> list[float]:
    """The distinct values away from the border, rounded for printing."""
    inner = y[BORDER:-BORDER, BORDER:-BORDER]
    return sorted({round(float(v), 3) for v in inner.ravel()})


METHODS = [("k3s2", "transposed conv\nkernel 3, stride 2"),
           ("k4s2", "transposed conv\nkernel 4, stride 2"),
           ("resize", "nearest resize x2,\nthen 3x3 conv")]


def make_checkerboard(out_dir: Path) -> Path:
    image = np.ones((SIZE, SIZE), np.float32)
    rng = np.random.default_rng(0)
    rows = [("uniform weights", np.ones((3, 3), np.float32), np.ones((4, 4), np.float32)),
            ("random weights (seed 0)", rng.uniform(0.5, 1.5, (3, 3)).astype(np.float32),
             rng.uniform(0.5, 1.5, (4, 4)).astype(np.float32))]
    fig, axes = plt.subplots(len(rows), len(METHODS), figsize=(10, 7), layout="constrained")
    for r, (row_name, w3, w4) in enumerate(rows):
        for c, (method, title) in enumerate(METHODS):
            y = upsample(method, image, w3, w4)
            values = interior_values(y)
            print(f"{row_name:24s} {method:7s} interior values: {values}")
            ax = axes[r, c]
            # Scale by the interior mean so that the three panels of a row compare.
            shown = y / y[BORDER:-BORDER, BORDER:-BORDER].mean()
            im = ax.imshow(shown, cmap="gray", vmin=0.0, vmax=1.5, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=11)
            ax.set_xlabel(f"{len(values)} distinct interior value"
                          f"{'s' if len(values) > 1 else ''}", fontsize=10)
        axes[r, 0].set_ylabel(row_name, fontsize=11)
    fig.colorbar(im, ax=axes, shrink=0.8, label="output / interior mean")
    fig.suptitle("Upsampling a constant 16x16 image to 32x32: any pattern is an artifact",
                 fontsize=12)
    path = out_dir / "checkerboard.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def make_profile(out_dir: Path) -> Path:
    """One row through the middle of the uniform-weight outputs: the 1-2-1 pattern."""
    image = np.ones((SIZE, SIZE), np.float32)
    w3, w4 = np.ones((3, 3), np.float32), np.ones((4, 4), np.float32)
    fig, ax = plt.subplots(figsize=(8, 3.2), layout="constrained")
    for (method, title), marker in zip(METHODS, "osd"):
        y = upsample(method, image, w3, w4)
        row = y[SIZE + 1]  # an odd row: for k3s2 it crosses both phases of W
        ax.plot(np.arange(row.size), row / row[BORDER:-BORDER].mean(), marker=marker,
                markersize=4, label=title.replace("\n", " "))
    ax.set_xlabel(f"output column (row index {SIZE + 1} of {2 * SIZE})")
    ax.set_ylabel("output / interior mean")
    ax.set_ylim(0, 1.6)
    ax.legend(fontsize=9, loc="lower center")
    ax.set_title("A line through the uniform-weight outputs")
    path = out_dir / "checkerboard_profile.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures",
                        help="directory for the PNG files (default: docs/figures)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in (make_checkerboard(args.out), make_profile(args.out)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
