"""`convtranspose apply`: stream a transposed convolution over a volume on disk.

    convtranspose apply volume.npy weight.npy -o up.zarr --stride 2 --padding 1

The output is written block by block: each output block is computed from the input slab
that reaches it (the same halo arithmetic as `convtranspose.dask`, in `_slabs`), so memory
stays bounded by a block, whatever the volume's size. The input `.npy` is memory-mapped and
only a slab at a time is touched (and unmapped again); a Zarr input reads only the chunks a
slab overlaps.

Completion is atomic: the result is written under a hidden temporary name
(`.NAME.partial`, beside OUTPUT) and renamed to OUTPUT only once every block is written. A
sidecar `.NAME.progress` records the finished blocks, so running the same command again after
Ctrl-C or a crash resumes where it stopped (a different command starts over).
Bad input exits with code 2 and a one-line message before anything is written.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._geometry import ceil_div
from ._slabs import AxisBlock, compute_block, even_bounds, spatial, spec_blocks
from ._spec import ConvSpec, make_spec

PROG = "convtranspose apply"
# Output per block, small next to the 300 MB peak we promise: two blocks are in memory at
# once (one computed, one written), and zarr adds its encoding buffers on top.
BLOCK_BYTES = {"npy": 32 * 2**20, "zarr": 16 * 2**20}
# Zarr chunks: small enough that zarr compresses several of a block at once, on every core.
DEFAULT_CHUNK_BYTES = 4 * 2**20
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class BadInput(Exception):
    """A problem with the command line or the files: exit code 2, nothing written."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "apply",
        help="stream a transposed convolution over a .npy or Zarr volume",
        description=(
            "Apply a transposed convolution (MLX semantics, channels last) to a volume on "
            "disk, block by block, with bounded memory. INPUT (N, *spatial, C_in) is a .npy "
            "(memory-mapped) or a Zarr array; WEIGHT (C_out, *kernel, C_in/groups) a .npy; "
            "OUTPUT a .zarr or .npy, written under a temporary name and renamed when "
            "complete. Settings take one int for every axis (2) or one per axis (1,2,2). "
            "Running the same command again after an interruption resumes it."))
    p.add_argument("input", metavar="INPUT", help="input volume: .npy or Zarr array")
    p.add_argument("weight", metavar="WEIGHT", help="weight: .npy")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                   help="result: a path ending in .zarr or .npy (replaced if it exists)")
    p.add_argument("--stride", default="1", metavar="S", help="e.g. 2 or 1,2,2 (default 1)")
    p.add_argument("--padding", default="0", metavar="P",
                   help="default 0; may be negative; LO:HI for uneven ends (ONNX pads), e.g. "
                        "0:1,1,1; or same (output = input * stride) or valid")
    p.add_argument("--dilation", default="1", metavar="D", help="default 1")
    p.add_argument("--output-padding", default="0", metavar="OP", help="default 0")
    p.add_argument("--output-size", metavar="O",
                   help="the spatial output size wanted (PyTorch's rule picks the output "
                        "padding), e.g. 64 or 16,64,64; not with --output-padding")
    p.add_argument("--groups", default="1", metavar="G", help="default 1")
    p.add_argument("--bias", metavar="B.npy", help="bias (C_out,) added to every position")
    p.add_argument("--chunk", metavar="C",
                   help="output chunk shape in output positions (the Zarr chunks): one int "
                        "(first spatial axis; the others whole) or one per spatial axis, e.g. "
                        "16,128,128. Default: chunks of about 4 MiB. Work proceeds in blocks "
                        "of whole chunks, 16-32 MiB each")
    p.add_argument("--quiet", action="store_true",
                   help="print nothing on success: no progress bar (drawn only when stderr "
                        "is a terminal) and no summary line")
    p.set_defaults(func=run)

    def one_line_error(message: str) -> None:
        # argparse would print the usage too: keep every bad-input message to one line.
        print(f"{PROG}: error: {message} (see '{PROG} --help')", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)

    p.error = one_line_error  # type: ignore[method-assign]
    return p


# --------------------------------------------------------------------------- arguments

def _parse_ints(name: str, text: str) -> int | tuple[int, ...]:
    """'2' -> 2, '1,2,2' -> (1, 2, 2); anything else is a BadInput naming the option."""
    parts = [t.strip() for t in str(text).split(",")]
    try:
        values = tuple(int(t) for t in parts)
    except ValueError:
        raise BadInput(f"{name} must be an int or comma-separated ints such as 2 or 1,2,2, "
                       f"got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _parse_padding(text: str) -> int | str | tuple:
    """'1' -> 1, '1,0:1' -> (1, (0, 1)), 'same' and 'valid' as they are."""
    text = str(text).strip()
    if text.lower() in ("same", "valid"):
        return text.lower()
    entries = []
    for part in text.split(","):
        try:
            pair = tuple(int(t) for t in part.split(":"))
        except ValueError:
            pair = ()
        if len(pair) not in (1, 2):
            raise BadInput(f"--padding must be same, valid, an int, or comma-separated "
                           f"entries each an int or LO:HI such as 1 or 0:1,1,1, got {text!r}")
        entries.append(pair[0] if len(pair) == 1 else pair)
    return entries[0] if len(entries) == 1 and isinstance(entries[0], int) else tuple(entries)


# How the Python API's argument names read on this command line (the spec's messages quote
# them: 'stride'); the spec stays the one place that words each rule.
_CLI_NAMES = {"input": "INPUT", "weight": "WEIGHT", "stride": "--stride",
              "padding": "--padding", "dilation": "--dilation",
              "output_padding": "--output-padding", "groups": "--groups"}
_SPATIAL_AXES = {1: "W", 2: "H,W", 3: "D,H,W"}
# A WEIGHT larger than INPUT on every spatial axis with more taps than this is a volume
# given in the wrong place: the legitimate kernels larger than their input (a 1x1x1 latent
# into a 4x4x4 kernel, 64 taps) are small.
_MAX_PLAUSIBLE_TAPS = 64


def _cli_words(message: str) -> str:
    """A message of the spec (written for Python callers) in this command's terms."""
    message = message.removeprefix(f"{PROG}: ")
    for name, flag in _CLI_NAMES.items():
        message = message.replace(f"'{name}'", flag)
    return message


def _check_axis_count(name: str, value: int | tuple[int, ...], ndim: int) -> None:
    """A setting is one int, or one per spatial axis of INPUT: said as the flag is typed."""
    if isinstance(value, (int, str)) or len(value) == ndim:
        return
    flag = _CLI_NAMES[name]
    got = ",".join(map(str, value))
    if ndim == 1:
        raise BadInput(f"{flag} takes one int for the 1-D INPUT (one spatial axis, W): "
                       f"e.g. {flag} 2; got {got}")
    example = ",".join(["1"] + ["2"] * (ndim - 1))
    raise BadInput(f"{flag} takes one int for every axis or {ndim} comma-separated ints, "
                   f"one per spatial axis ({_SPATIAL_AXES[ndim]}) of the {ndim}-D INPUT: "
                   f"e.g. {flag} 2 or {flag} {example}; got {got} ({len(value)} values)")


def _looks_swapped(x_shape: tuple[int, ...], w_shape: tuple[int, ...], settings: dict,
                   groups: int) -> bool:
    """True when INPUT reads as a weight and WEIGHT as a volume: WEIGHT's "kernel" is larger
    than INPUT's extent on every spatial axis and has more taps than any layer in use, and
    the files taken the other way round make a valid call. The legitimate kernel larger than
    its input (a 1x1 latent into a 4x4 kernel) stays within the taps limit."""
    if len(x_shape) != len(w_shape) or len(x_shape) not in (3, 4, 5):
        return False
    kernel, extent = w_shape[1:-1], x_shape[1:-1]
    if math.prod(kernel) <= _MAX_PLAUSIBLE_TAPS or any(k <= e for k, e in zip(kernel, extent)):
        return False
    try:
        make_spec(PROG, len(x_shape) - 2, w_shape, x_shape, settings["stride"],
                  settings["padding"], settings["dilation"], settings["output_padding"],
                  groups)
    except (TypeError, ValueError):
        return False
    return True


def _swapped_message(args: argparse.Namespace, x_shape: tuple[int, ...],
                     w_shape: tuple[int, ...]) -> str:
    ndim = len(x_shape) - 2
    axes = _SPATIAL_AXES[ndim]
    kernel = "x".join(map(str, x_shape[1:-1]))
    volume = "x".join(map(str, w_shape[1:-1]))
    return (f"INPUT and WEIGHT look swapped: INPUT {args.input} {x_shape} reads as a weight "
            f"(C_out, {axes} kernel {kernel}, C_in/groups) and WEIGHT {args.weight} "
            f"{w_shape} as a volume (N, {axes} {volume}, C_in); give the volume first: "
            f"{PROG} {args.weight} {args.input} -o {args.output} with the same options")


def _load_small_npy(name: str, path: str, mapped: bool = False) -> np.ndarray:
    """`mapped`: read only the header now (a WEIGHT given in place of a big volume must not
    be read whole before its shape is checked)."""
    if not os.path.isfile(path):
        raise BadInput(f"{name} {path!r} does not exist or is not a file")
    try:
        arr = np.load(path, mmap_mode="r" if mapped else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise BadInput(f"{name} {path!r} is not a readable .npy file: {exc}") from None
    if not isinstance(arr, np.ndarray):
        raise BadInput(f"{name} {path!r} must hold one array (.npy), not an archive")
    return arr


def _open_input(path: str) -> tuple[Any, str]:
    """The input as an array-like that reads lazily, and its kind ('npy' or 'zarr')."""
    if not os.path.exists(path):
        raise BadInput(f"INPUT {path!r} does not exist")
    if os.path.isfile(path) and not path.endswith(".zarr"):
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False), "npy"
        except (OSError, ValueError, EOFError) as exc:
            raise BadInput(f"INPUT {path!r} is not a readable .npy file: {exc}") from None
    zarr = _import_zarr("reading a Zarr INPUT")
    try:
        arr = zarr.open_array(path, mode="r")
    except Exception as exc:  # zarr raises many kinds for "not an array here"
        raise BadInput(f"INPUT {path!r} is neither a .npy file nor a Zarr array: "
                       f"{type(exc).__name__}: {exc}") from None
    return arr, "zarr"


def _import_zarr(why: str) -> Any:
    try:
        import zarr
    except ImportError:
        raise BadInput(f"{why} needs zarr: pip install 'convtranspose[dask]'") from None
    return zarr


def _fit(shape: tuple[int, ...], item_bytes: int, budget: int) -> tuple[int, ...]:
    """The largest block of `shape` within `budget` bytes that keeps trailing axes whole
    (so that it is one contiguous run in C order)."""
    sizes, run = list(shape), item_bytes
    for axis in range(len(shape) - 1, -1, -1):
        if run * shape[axis] > budget:
            sizes[axis] = max(1, budget // run)
            sizes[:axis] = [1] * axis
            break
        run *= shape[axis]
    return tuple(sizes)


def _chunk_shape(spec: ConvSpec, chunk: Any) -> tuple[int, ...]:
    """The output chunk (samples, *spatial sizes): --chunk, or about DEFAULT_CHUNK_BYTES."""
    out = spatial(spec, "out_spatial")
    if chunk is None:
        return _fit((spec.batch, *out), spec.c_out * spec.result_dtype.itemsize,
                    DEFAULT_CHUNK_BYTES)
    sizes = (chunk,) if isinstance(chunk, int) else tuple(chunk)
    if min(sizes) < 1:
        raise BadInput(f"--chunk sizes must be >= 1, got {','.join(map(str, sizes))}")
    if len(sizes) == 1:
        sizes = (sizes[0], *out[1:])
    if len(sizes) != len(out):
        raise BadInput(f"--chunk must be one int or {len(out)} comma-separated ints (one per "
                       f"spatial axis), got {len(sizes)}")
    return (1, *(min(c, o) for c, o in zip(sizes, out)))


def _block_shape(chunk: tuple[int, ...], full: tuple[int, ...], item_bytes: int,
                 budget: int) -> tuple[int, ...]:
    """Whole chunks adding up to about `budget` bytes (at least one chunk): grow the
    innermost split axis first, in multiples of the chunk, so blocks stay on the chunk grid
    and each Zarr chunk is written exactly once."""
    block = list(chunk)
    for axis in range(len(full) - 1, -1, -1):
        if block[axis] >= full[axis]:
            continue
        factor = max(1, budget // (math.prod(block) * item_bytes))
        block[axis] = min(full[axis], block[axis] * factor)
        if block[axis] < full[axis]:
            break
    return tuple(block)


# --------------------------------------------------------------------------- the job

@dataclass
class Job:
    spec: ConvSpec
    input_path: str
    input_kind: str
    weight: np.ndarray
    bias: np.ndarray | None
    output: str
    out_kind: str
    chunk: tuple[int, ...]  # (samples, *spatial sizes) of one output chunk
    block: tuple[int, ...]  # (samples, *spatial sizes) of one block: whole chunks
    axis_blocks: list[list[AxisBlock]]
    fingerprint: dict = field(default_factory=dict)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.spec.output_shape

    @property
    def out_bytes(self) -> int:
        return math.prod(self.out_shape) * self.spec.result_dtype.itemsize

    def blocks(self):
        """Every output block as (index, (n0, n1), AxisBlocks), in file order."""
        index = 0
        for n0 in range(0, self.spec.batch, self.block[0]):
            n1 = min(self.spec.batch, n0 + self.block[0])
            for combo in itertools.product(*self.axis_blocks):
                yield index, (n0, n1), combo
                index += 1

    @property
    def n_blocks(self) -> int:
        per = math.prod(len(a) for a in self.axis_blocks)
        return per * ceil_div(self.spec.batch, self.block[0])


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare(args: argparse.Namespace) -> Job:
    """Read and check everything the run needs; raise BadInput; write nothing."""
    out = args.output
    if out.endswith("/"):
        out = out.rstrip("/")
    out_kind = "zarr" if out.endswith(".zarr") else "npy" if out.endswith(".npy") else None
    if out_kind is None:
        raise BadInput(f"OUTPUT must end in .zarr or .npy, got {args.output!r}")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise BadInput(f"OUTPUT's folder {parent!r} does not exist")
    if os.path.abspath(out) == os.path.abspath(args.input):
        raise BadInput("OUTPUT must differ from INPUT")
    if os.path.isdir(out) and not any(os.path.exists(os.path.join(out, marker))
                                      for marker in ("zarr.json", ".zarray", ".zgroup")):
        # Replacing OUTPUT deletes the old one: never a folder that is not a Zarr store.
        raise BadInput(f"OUTPUT {args.output!r} is an existing folder that is not a Zarr "
                       f"store; remove it or choose another name")

    settings = {name: _parse_ints(f"--{name.replace('_', '-')}", getattr(args, name))
                for name in ("stride", "dilation", "output_padding")}
    settings["padding"] = _parse_padding(args.padding)
    output_size = (None if args.output_size is None
                   else _parse_ints("--output-size", args.output_size))
    groups = _parse_ints("--groups", args.groups)
    if not isinstance(groups, int):
        raise BadInput(f"--groups must be one int, got {args.groups!r}")
    chunk = None if args.chunk in (None, "auto") else _parse_ints("--chunk", args.chunk)

    x, kind = _open_input(args.input)
    w = _load_small_npy("WEIGHT", args.weight, mapped=True)
    ndim = len(x.shape) - 2
    if ndim not in (1, 2, 3):
        raise BadInput(f"INPUT must have 3, 4 or 5 dimensions (N, *spatial, C_in), channels "
                       f"last; got shape {tuple(x.shape)}")
    for name, value in settings.items():
        _check_axis_count(name, value, ndim)
    swapped = _looks_swapped(tuple(x.shape), w.shape, settings, groups)
    try:
        spec = make_spec(PROG, ndim, tuple(x.shape), w.shape, settings["stride"],
                         settings["padding"], settings["dilation"],
                         settings["output_padding"], groups, x.dtype, w.dtype,
                         output_size=output_size)
    except (TypeError, ValueError) as exc:
        if swapped:
            raise BadInput(_swapped_message(args, tuple(x.shape), w.shape)) from None
        raise BadInput(_cli_words(str(exc))) from None
    if swapped:
        raise BadInput(_swapped_message(args, tuple(x.shape), w.shape))

    w = np.array(w)  # checked: now read it whole
    bias = None
    if args.bias is not None:
        bias = _load_small_npy("--bias", args.bias)
        if bias.dtype.kind != "f":
            raise BadInput(f"--bias must hold floats, got dtype {bias.dtype}")
        if bias.shape != (spec.c_out,):
            raise BadInput(f"--bias must have shape (C_out,) = ({spec.c_out},) to match "
                           f"WEIGHT {w.shape}, got {bias.shape}")
    if out_kind == "zarr":
        _import_zarr("writing a .zarr OUTPUT")

    out_spatial = spatial(spec, "out_spatial")
    chunk_shape = _chunk_shape(spec, chunk)
    block = _block_shape(chunk_shape, (spec.batch, *out_spatial),
                         spec.c_out * spec.result_dtype.itemsize, BLOCK_BYTES[out_kind])
    bounds = [even_bounds(o, b) for o, b in zip(out_spatial, block[1:])]
    stat = os.stat(args.input)
    fingerprint = {
        "version": 1, "input": os.path.abspath(args.input), "input_shape": list(x.shape),
        "input_dtype": str(x.dtype), "input_mtime_ns": stat.st_mtime_ns,
        "input_size": stat.st_size, "weight": _sha256(args.weight),
        "bias": _sha256(args.bias) if args.bias else None,
        "settings": {k: v if isinstance(v, (int, str)) else list(v)
                     for k, v in settings.items()},
        "output_size": output_size,
        "groups": groups, "chunk": list(chunk_shape), "block": list(block),
        "output": out_kind, "dtype": spec.result_dtype.name,
    }
    return Job(spec=spec, input_path=args.input, input_kind=kind, weight=w, bias=bias,
               output=out, out_kind=out_kind, chunk=chunk_shape, block=block,
               axis_blocks=spec_blocks(spec, bounds), fingerprint=fingerprint)


# --------------------------------------------------------------------------- reading

class InputReader:
    """Reads one slab at a time. A .npy is mapped afresh for every slab and unmapped after
    it, so the pages a slab touched leave this process's resident memory."""

    def __init__(self, path: str, kind: str):
        self.path, self.kind = path, kind
        self._zarr = _import_zarr("reading a Zarr INPUT").open_array(path, mode="r") \
            if kind == "zarr" else None

    def read(self, index: tuple[slice, ...]) -> np.ndarray:
        if self._zarr is not None:
            return np.asarray(self._zarr[index])
        mapped = np.load(self.path, mmap_mode="r", allow_pickle=False)
        try:
            return np.array(mapped[index])  # a private copy of just this slab
        finally:
            mm = getattr(mapped, "_mmap", None)
            del mapped
            if mm is not None:
                try:
                    mm.close()
                except BufferError:  # still exported somewhere: gc will unmap it
                    pass


# --------------------------------------------------------------------------- writing

class NpyWriter:
    """Writes blocks into a .npy with positioned writes, never mapping the output (mapped
    dirty pages would count as this process's memory)."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype, resume: bool):
        if not resume:
            # open_memmap writes a valid header and sizes the (sparse) file; no page touched.
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            del mm
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            got_shape, _, got_dtype = read_header(f)
            self.offset = f.tell()
        if tuple(got_shape) != tuple(shape) or np.dtype(got_dtype) != np.dtype(dtype):
            raise OSError(f"{path}: unexpected header {got_shape} {got_dtype}")
        self.shape, self.itemsize = shape, np.dtype(dtype).itemsize
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, start: tuple[int, ...], block: np.ndarray) -> None:
        block = np.ascontiguousarray(block)
        # Axes from `t` on are whole, so each index over the axes before `t` is one run.
        t = len(self.shape)
        while t > 0 and block.shape[t - 1] == self.shape[t - 1]:
            t -= 1
        t = max(t - 1, 0)
        strides = np.cumprod((1, *self.shape[::-1]))[:-1][::-1]  # elements per step
        for lead in np.ndindex(*block.shape[:t]):
            pos = (*(s + i for s, i in zip(start, lead)), *start[t:])
            offset = self.offset + self.itemsize * int(np.dot(pos, strides))
            data = memoryview(block[lead]).cast("B")
            while len(data):
                written = os.pwrite(self.fd, data, offset)
                data, offset = data[written:], offset + written

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


class ZarrWriter:
    def __init__(self, path: str, shape: tuple[int, ...], chunks: tuple[int, ...],
                 dtype: np.dtype, resume: bool):
        zarr = _import_zarr("writing a .zarr OUTPUT")
        if resume:
            self.array = zarr.open_array(path, mode="r+")
            if tuple(self.array.shape) != tuple(shape) or self.array.dtype != dtype:
                raise OSError(f"{path}: unexpected array {self.array.shape} {self.array.dtype}")
        else:
            # open_array(mode="w") means the same in zarr 2 and 3 (the extra allows both).
            self.array = zarr.open_array(path, mode="w", shape=shape, chunks=chunks,
                                         dtype=dtype, fill_value=0)

    def write(self, start: tuple[int, ...], block: np.ndarray) -> None:
        self.array[tuple(slice(s, s + n) for s, n in zip(start, block.shape))] = block

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- progress

def _bytes_text(size: float) -> str:
    """'288 kB', '4.5 MB', '131 MB': a small output does not read as 0 MB."""
    if size < 1e6:
        return f"{size / 1e3:.0f} kB"
    return f"{size / 1e6:.1f} MB" if size < 1e7 else f"{size / 1e6:.0f} MB"


def eta_text(seconds: float) -> str:
    """m:ss, rounded up: it reads 0:00 only once nothing is left (0.6 s left is 0:01)."""
    if not math.isfinite(seconds):
        return "-:--"
    whole = math.ceil(max(seconds, 0.0))
    return f"{whole // 60}:{whole % 60:02d}"


class Progress:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, total_bytes: int, enabled: bool, verbose: bool = True,
                 stream: Any = None):
        self.total, self.enabled, self.verbose = total_bytes, enabled, verbose
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.last = 0.0
        self.done = 0
        self.resumed = 0
        self.width = 0

    def update(self, done_bytes: int, force: bool = False) -> None:
        self.done = done_bytes
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < 0.1:
            return
        self.last = now
        frac = done_bytes / self.total if self.total else 1.0
        elapsed = max(now - self.start, 1e-9)
        rate = (done_bytes - self.resumed) / elapsed
        eta = (self.total - done_bytes) / rate if rate > 0 else float("inf")
        tail = (f" {frac:4.0%} {done_bytes / 1e6:.0f}/{self.total / 1e6:.0f} MB "
                f"{rate / 1e6:.1f} MB/s ETA {eta_text(eta)}")
        width = max(10, min(40, shutil.get_terminal_size((80, 20)).columns - len(tail) - 3))
        filled = int(round(frac * width))
        line = f"[{'#' * filled}{'.' * (width - filled)}]{tail}"
        # Pad over a longer previous line so that no stale characters remain.
        self.stream.write("\r" + line.ljust(self.width))
        self.width = len(line)
        self.stream.flush()

    def note(self, message: str) -> None:
        """An informational line (not with --quiet)."""
        if self.verbose:
            self.stream.write(message + "\n")
            self.stream.flush()

    def finish(self, message: str) -> None:
        """The closing summary: under the bar on a terminal, else one line (not --quiet)."""
        if self.enabled:
            self.update(self.done, force=True)
            self.stream.write("\n")
        if self.verbose:
            self.stream.write(f"{message}\n")
            self.stream.flush()


# --------------------------------------------------------------------------- running

def _paths(output: str) -> tuple[str, str]:
    """The temporary result and the progress sidecar, hidden beside OUTPUT."""
    folder, name = os.path.split(os.path.abspath(output))
    return os.path.join(folder, f".{name}.partial"), os.path.join(folder, f".{name}.progress")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _load_progress(sidecar: str, temp: str, fingerprint: dict) -> set[int]:
    """Blocks already written by an interrupted run of this very command (else none)."""
    if not (os.path.exists(sidecar) and os.path.exists(temp)):
        return set()
    try:
        with open(sidecar) as f:
            lines = f.read().splitlines()
        if json.loads(lines[0]) != fingerprint:
            return set()
        return {int(line) for line in lines[1:] if line.strip().isdigit()}
    except (OSError, ValueError, IndexError):
        return set()


def _install(temp: str, output: str) -> None:
    """Rename the finished temporary result to OUTPUT, replacing an older one."""
    if os.path.isfile(temp) and not os.path.isdir(output):
        os.replace(temp, output)  # one atomic step
        return
    # A directory (Zarr) cannot replace anything in one step: move the old one aside first.
    old = temp + ".old"
    _remove(old)
    if os.path.lexists(output):
        os.rename(output, old)
    os.rename(temp, output)
    _remove(old)


def execute(job: Job, progress: Progress) -> None:
    spec = job.spec
    temp, sidecar = _paths(job.output)
    done = _load_progress(sidecar, temp, job.fingerprint)
    if not done:
        _remove(temp)
        _remove(sidecar)
    dtype = spec.result_dtype
    if job.out_kind == "npy":
        writer: Any = NpyWriter(temp, job.out_shape, dtype, resume=bool(done))
    else:
        chunks = (*job.chunk, spec.c_out)
        writer = ZarrWriter(temp, job.out_shape, chunks, dtype, resume=bool(done))
    reader = InputReader(job.input_path, job.input_kind)
    bias = job.bias  # added by the kernel as it stores each block
    c_in = spec.c_in
    if done:
        progress.note(f"{PROG}: resuming an interrupted run: {len(done)} of {job.n_blocks} "
                      f"blocks already written")
    # One block is written by a helper thread while the next one is computed (the write
    # releases the GIL); at most two blocks are in memory at once.
    pool = ThreadPoolExecutor(1, thread_name_prefix="convtranspose-apply-write")
    pending: list = []  # [(future, block index, bytes)] of the write in flight
    written = 0

    def settle(log) -> None:
        nonlocal written
        while pending:
            future, index, size = pending.pop()
            future.result()
            # The block's bytes are in the file before the log says so.
            log.write(f"{index}\n")
            log.flush()
            written += size
            progress.update(written)

    try:
        # (Re)write the log whole: an interrupted run may have left half a line at its end.
        with open(sidecar, "w") as log:
            log.write(json.dumps(job.fingerprint) + "\n")
            log.writelines(f"{i}\n" for i in sorted(done))
            log.flush()
            progress.update(0, force=True)
            for index, (n0, n1), blocks in job.blocks():
                size = (n1 - n0) * math.prod(b.out_stop - b.out_start for b in blocks) \
                    * spec.c_out * dtype.itemsize
                if index in done:
                    written += size
                    progress.resumed = written
                    continue
                if any(b.empty for b in blocks):
                    slab = np.empty((n1 - n0, *(0 for _ in blocks), c_in), spec.input_dtype)
                else:
                    slab = reader.read((slice(n0, n1), *(slice(b.in_start, b.in_stop)
                                                         for b in blocks), slice(None)))
                out = compute_block(spec, slab, job.weight, blocks, bias)
                del slab
                settle(log)
                start = (n0, *(b.out_start for b in blocks), 0)
                pending.append((pool.submit(writer.write, start, out), index, size))
                del out
            settle(log)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    writer.close()
    _install(temp, job.output)
    _remove(sidecar)


def run(args: argparse.Namespace) -> int:
    try:
        job = prepare(args)
    except BadInput as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED  # nothing was written yet
    show = not args.quiet and sys.stderr.isatty()
    progress = Progress(job.out_bytes, show, verbose=not args.quiet)
    start = time.monotonic()
    try:
        execute(job, progress)
    except KeyboardInterrupt:
        if show:
            sys.stderr.write("\n")
        print(f"{PROG}: interrupted; {job.output} left as it was (run the same command "
              f"again to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        print(f"{PROG}: error: writing {job.output} failed: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - start
    progress.finish(f"wrote {job.output}: {job.out_shape} {job.spec.result_dtype.name}, "
                    f"{_bytes_text(job.out_bytes)} in {elapsed:.1f} s "
                    f"({_bytes_text(job.out_bytes / max(elapsed, 1e-9))}/s)")
    return 0
