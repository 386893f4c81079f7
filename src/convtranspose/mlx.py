"""MLX drop-in: `mx.array` in, `mx.array` out, computed by convtranspose's CPU kernel.

    >>> import mlx.core as mx
    >>> from convtranspose import mlx as ctm
    >>> x, w = mx.ones((1, 4, 4, 4, 8)), mx.ones((16, 3, 3, 3, 8))
    >>> ctm.conv_transpose3d(x, w, stride=2, padding=1).shape
    (1, 7, 7, 7, 16)

`conv_transpose1d/2d/3d` have MLX's signatures and semantics; the layers
`ConvTranspose1d/2d/3d` take `mlx.nn.ConvTranspose*d`'s constructor arguments, initialise
`weight` and `bias` the same way, and add `groups` (in every dimension, 3-D included).

**A first-class MLX operation.** The call is an MLX primitive (C++, `mlx_ext/ct_mlx.cpp`):
its `eval_cpu` runs convtranspose's compiled kernel on MLX's buffers on MLX's CPU stream,
without Python or NumPy in the loop (the kernel is reached through a C function table that
`convtranspose._native` exports). So it works under `mx.compile`, `mx.vmap`, `mx.grad`,
`mx.value_and_grad`, `mx.vjp`, `mx.jvp`, and in compiled training steps with
`inputs=`/`outputs=` state. Gradients: grad_input is a second primitive (a strided
correlation on the same kernel) and grad_weight is built from MLX ops (a matmul per tap),
so every order of derivative is an MLX graph; jvp is the primitive on the tangents (it is
linear in each argument); vmap folds a mapped input axis into the batch, and runs a mapped
weight item by item. float16/bfloat16 compute in float32 and are rounded back by MLX.
The primitive takes the kernel from `convtranspose._native.c_api()` (a capsule holding the
C function table of csrc/ct_capi.h), so both modules share one kernel build and one thread
pool; it runs the direct path of the planner (one correlation per output phase and group,
the kernel's three weight layouts, input slabs kept in cache, the pool's threads), not its
Winograd or tiling choices.

**Building it.** The extension is compiled at first use against the installed MLX (its
CMake config, nanobind in MLX's type domain so that `mx.array` passes across), once per
MLX/nanobind/Python/source version, into a user cache directory
(`$CONVTRANSPOSE_CACHE_DIR`, else `$XDG_CACHE_HOME/convtranspose`, else
`~/.cache/convtranspose`), under a file lock; it needs `cmake`, `nanobind` (both in the
`[mlx]` extra) and a C++ compiler, and takes about a minute. `build_extension()` does it
ahead of time; `CONVTRANSPOSE_MLX_EXTENSION=0` turns it off.

**Without it** (no compiler, a failed build, or turned off) eager calls take the older
path (inputs evaluated, NumPy, `mx.custom_function`), and `extension_error()` says why.
That path cannot go inside `mx.compile` or `mx.vmap` (a call there raises a RuntimeError
naming the reason and the fix) and has first-order gradients only (a second-order one
raises).

**Streams.** The primitive runs on the CPU. On a GPU stream or device (`stream=`, or a GPU
default device) the call defers to MLX's own `mx.conv_transpose*d`; MLX has no groups in
3-D, and that call raises a ValueError naming the stream (pass `stream=mx.cpu`).

This module imports MLX; `import convtranspose` alone never does.
"""

import functools
import hashlib
import importlib.metadata
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ._api import spec_for
from ._arrays import mlx_to_numpy
from ._execute import execute
from ._plan import STREAM_OUTPUT_FROM_BYTES, get_num_threads, make_plan
from ._spec import OP_NAMES, IntOrTuple, make_spec
from ._vjp import check_cotangent, vjp_arrays

# --- The compiled primitive: built at first use, cached per version ------------------------

_PACKAGE = Path(__file__).resolve().parent
_SOURCES = (_PACKAGE / "mlx_ext" / "ct_mlx.cpp", _PACKAGE / "mlx_ext" / "CMakeLists.txt",
            _PACKAGE / "csrc" / "ct_capi.h", _PACKAGE / "csrc" / "correlate_api.h")
_FIX = ("install the build tools with `pip install \"convtranspose[mlx]\"` (cmake, nanobind) "
        "and a C++ compiler (g++ or clang++), then call convtranspose.mlx.build_extension() "
        "to see the build's own error")
_lock = threading.Lock()
_state: dict[str, Any] = {}  # "ext": the loaded module, or "error": why there is none


def _cache_dir() -> Path:
    root = os.environ.get("CONVTRANSPOSE_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                            "convtranspose")
    return Path(root) / "mlx-ext"


def _build_key() -> str:
    """What the binary depends on: MLX and nanobind (its ABI must match MLX's), Python, and
    our sources."""
    digest = hashlib.sha256()
    for name in ("mlx", "nanobind"):
        try:
            digest.update(f"{name}={importlib.metadata.version(name)};".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{name}=none;".encode())
    digest.update((sysconfig.get_config_var("EXT_SUFFIX") or "").encode())
    digest.update(sys.version.encode())
    for path in _SOURCES:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _module_file(folder: Path) -> Path | None:
    found = sorted(folder.glob("_ct_mlx*.so")) + sorted(folder.glob("_ct_mlx*.pyd"))
    return found[0] if found else None


def _compile(folder: Path) -> None:
    """cmake configure + build into `folder` (the caller holds the lock)."""
    # On PATH, or beside this Python (pip's cmake in a venv that is not activated).
    cmake = shutil.which("cmake") or shutil.which("cmake", path=sysconfig.get_path("scripts"))
    if cmake is None:
        raise RuntimeError("cmake was not found (on PATH or beside this Python)")
    if importlib.util.find_spec("nanobind") is None:
        raise RuntimeError("the nanobind package is not installed")
    build = folder / "build"
    staging = build / "out"  # moved into `folder` once linked: never a half-written module
    log = folder / "build.log"
    mlx_root = str(Path(importlib.util.find_spec("mlx").submodule_search_locations[0]))
    steps = [
        [cmake, "-S", str(_PACKAGE / "mlx_ext"), "-B", str(build),
         f"-DPython_EXECUTABLE={sys.executable}", f"-DCT_OUTPUT_DIR={staging}",
         f"-DMLX_ROOT={mlx_root}", "-DCMAKE_BUILD_TYPE=Release"],
        [cmake, "--build", str(build), "-j", str(max(1, min(4, os.cpu_count() or 1)))],
    ]
    with open(log, "w") as out:
        for step in steps:
            done = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, check=False)
            if done.returncode:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the build failed (log: {log}):\n{tail}")
    built = _module_file(staging)
    if built is None:
        raise RuntimeError(f"the build made no module (log: {log})")
    os.replace(built, folder / built.name)
    shutil.rmtree(build, ignore_errors=True)


def _load(path: Path) -> Any:
    from . import _native_kernel

    if not _native_kernel.AVAILABLE:
        raise RuntimeError("convtranspose's compiled kernel (convtranspose._native) is not "
                           "built, and the MLX primitive runs it")
    spec = importlib.util.spec_from_file_location("convtranspose._ct_mlx", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.set_api(_native_kernel._native.c_api())
    try:  # an mx.array must cross into the module: nanobind's ABI must match MLX's
        probe = module.conv_transpose(mx.ones((1, 2, 1)), mx.ones((1, 1, 1)), 1, [1], [0],
                                      [1], [0], 1, 1, STREAM_OUTPUT_FROM_BYTES, stream=mx.cpu)
        mx.eval(probe)
    except TypeError as exc:
        raise RuntimeError(f"the extension does not accept MLX's arrays (nanobind's ABI "
                           f"differs from the one MLX was built with): {exc}") from None
    return module


def build_extension() -> str:
    """Build (if needed) and load the compiled MLX primitive; returns its path. Raises a
    RuntimeError with the build's error where it cannot (see the module's docstring)."""
    with _lock:
        if "ext" in _state:
            return _state["ext"].__file__
        folder = _cache_dir() / _build_key()
        folder.mkdir(parents=True, exist_ok=True)
        import fcntl  # POSIX; Windows has no cached build yet (the fallback serves)

        with open(folder / "lock", "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)  # another process may be building it
            path = _module_file(folder)
            if path is None:
                print("convtranspose.mlx: compiling the MLX primitive against mlx "
                      f"{mx.__version__} (once, about a minute) into {folder}",
                      file=sys.stderr)
                _compile(folder)
                path = _module_file(folder)
        _state["ext"] = _load(path)
        _state.pop("error", None)
        return str(path)


def _extension() -> Any:
    """The loaded primitive module, or None (the reason in `extension_error()`)."""
    ext = _state.get("ext")
    if ext is not None or "error" in _state:
        return ext
    if os.environ.get("CONVTRANSPOSE_MLX_EXTENSION", "1").strip() in ("0", "off", "no"):
        _state["error"] = "it is turned off (CONVTRANSPOSE_MLX_EXTENSION=0)"
        return None
    try:
        build_extension()
    except Exception as exc:  # any failure: the eager path still serves, and says why
        _state["error"] = f"{type(exc).__name__}: {exc}"
        return None
    return _state["ext"]


def extension_error() -> str | None:
    """Why the compiled MLX primitive is not in use (None when it is)."""
    _extension()
    return _state.get("error")


def _needs_extension(op: str, what: str) -> RuntimeError:
    return RuntimeError(
        f"{op}: {what} needs convtranspose's compiled MLX primitive, which is not available "
        f"because {_state.get('error')}. To fix: {_FIX}.")


def _to_mx(a: np.ndarray, dtype: Any) -> mx.array:
    # mx.array(float64 ndarray) would silently give float32: always name the dtype.
    if a.dtype.name == _dtype_name(dtype):
        return mx.array(a, dtype=dtype)
    return mx.array(a).astype(dtype)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _on_gpu(op: str, stream: Any) -> bool:
    """Whether the call goes to a GPU (its stream or device, else MLX's default device)."""
    if stream is None:
        return mx.default_device().type == mx.gpu
    device = getattr(stream, "device", stream)  # a Stream's device, or the Device itself
    kind = getattr(device, "type", device)  # a Device's type, or the DeviceType itself
    if isinstance(kind, str):
        kind = {"cpu": mx.cpu, "gpu": mx.gpu}.get(kind.lower(), kind)
    if isinstance(kind, mx.DeviceType):
        return kind == mx.gpu
    raise ValueError(f"{op}: 'stream' must be None, an MLX stream or device, got {stream!r}")


def _settings_key(spec) -> tuple:
    lift = 3 - spec.ndim
    return (spec.ndim, spec.stride[lift:], spec.padding[lift:], spec.dilation[lift:],
            spec.output_padding[lift:], spec.groups)


def _evaluated(op: str, arrays: tuple) -> list[np.ndarray]:
    """NumPy views of arrays for the fallback, which must evaluate them: under mx.compile or
    mx.vmap MLX refuses, and the error says what to do instead."""
    try:
        return [mlx_to_numpy(a) for a in arrays]
    except ValueError as exc:
        if "transformation" in str(exc):
            raise _needs_extension(op, "a call under mx.compile or mx.vmap") from None
        raise


@functools.lru_cache(maxsize=256)
def _first_order_only(op: str):
    """Identity on its first argument, whose own gradient raises: the fallback's gradients
    are NumPy results, constants to MLX, and differentiating them again would silently
    drop terms."""

    @mx.custom_function
    def guard(value, *depends_on):
        return value

    @guard.vjp
    def guard_vjp(primals, cotangent, output):
        raise _needs_extension(op, "a second-order gradient")

    return guard


@functools.lru_cache(maxsize=256)
def _primitive(ndim: int, stride: tuple, padding: tuple, dilation: tuple,
               output_padding: tuple, groups: int):
    """The fallback: one differentiable MLX function per setting (custom functions take
    arrays only), computed on NumPy."""
    op = OP_NAMES[ndim]
    settings = (stride, padding, dilation, output_padding, groups)

    @mx.custom_function
    def conv(x, w):
        xn, wn = _evaluated(op, (x, w))
        spec, xn, wn = spec_for(ndim, xn, wn, *settings, op=op)
        out = execute(make_plan(spec), xn, wn)
        return _to_mx(out, mx.result_type(x, w))

    @conv.vjp
    def conv_vjp(primals, cotangent, output):
        x, w = primals
        if isinstance(cotangent, (list, tuple)):
            (cotangent,) = cotangent
        xn, wn, cn = _evaluated(op, (x, w, cotangent))
        spec, xn, wn = spec_for(ndim, xn, wn, *settings, op=op)
        gx, gw = vjp_arrays(spec, xn, wn, check_cotangent(op, spec, cn))
        guard = _first_order_only(op)
        return (guard(_to_mx(gx, x.dtype), cotangent, w),
                guard(_to_mx(gw, w.dtype), cotangent, x))

    return conv


@functools.lru_cache(maxsize=1024)
def _validated(ndim: int, x_shape: tuple, x_dtype: Any, w_shape: tuple, w_dtype: Any,
               stride: Any, padding: Any, dilation: Any, output_padding: Any,
               groups: Any) -> tuple:
    """The call's settings, validated on shapes and dtypes alone (so that a bad call fails
    here, named), as per-axis lists; cached, since a small layer's call costs ~20 us."""
    spec = make_spec(OP_NAMES[ndim], ndim, x_shape, w_shape, stride, padding, dilation,
                     output_padding, groups, _probe_dtype(x_dtype), _probe_dtype(w_dtype))
    return _settings_key(spec)


def _cache_key(value: Any) -> Any:
    """Settings as a cache key where they are exact ints (2.0 == 2 and True == 1 as keys,
    and validation refuses those); else None, and the call validates uncached."""
    if type(value) is int:
        return value
    if type(value) is tuple and all(type(v) is int for v in value):
        return value
    return None


def _settings(ndim: int, input: mx.array, weight: mx.array, *settings: Any) -> tuple:
    args = (ndim, tuple(input.shape), input.dtype, tuple(weight.shape), weight.dtype)
    keys = tuple(_cache_key(v) for v in settings)
    if any(k is None for k in keys):
        return _validated.__wrapped__(*args, *settings)
    return _validated(*args, *keys)


def _compute_dtype(dtype: Any) -> Any:
    return mx.float64 if dtype == mx.float64 else mx.float32


def _conv_transpose(ndim: int, input: Any, weight: Any, stride: IntOrTuple,
                    padding: IntOrTuple, dilation: IntOrTuple, output_padding: IntOrTuple,
                    groups: int, stream: Any) -> mx.array:
    op = OP_NAMES[ndim]
    gpu = _on_gpu(op, stream)
    if not isinstance(input, mx.array):
        input = mx.array(input)
    if not isinstance(weight, mx.array):
        weight = mx.array(weight)
    settings = _settings(ndim, input, weight, stride, padding, dilation, output_padding,
                         groups)
    if gpu:
        return _mlx_own(op, ndim, input, weight, settings, stream)
    ext = _extension()
    if ext is None:
        return _primitive(*settings)(input, weight)
    _, stride3, padding3, dilation3, output_padding3, groups = settings
    result = mx.result_type(input, weight)
    compute = _compute_dtype(result)
    x = input if input.dtype == compute else input.astype(compute)
    w = weight if weight.dtype == compute else weight.astype(compute)
    y = ext.conv_transpose(x, w, ndim, list(stride3), list(padding3), list(dilation3),
                           list(output_padding3), groups, get_num_threads(),
                           STREAM_OUTPUT_FROM_BYTES, stream=mx.cpu)
    return y if result == compute else y.astype(result)


def _mlx_own(op: str, ndim: int, input: mx.array, weight: mx.array, settings: tuple,
             stream: Any) -> mx.array:
    """A GPU call: MLX's own op computes it (ours runs on the CPU)."""
    _, stride, padding, dilation, output_padding, groups = settings
    if ndim == 3 and groups > 1:
        where = "the default device (a GPU)" if stream is None else f"stream={stream!r}"
        raise ValueError(
            f"{op}: groups={groups} on {where}: there convtranspose defers to MLX's own "
            f"mx.{op}, which has no groups in 3-D; pass stream=mx.cpu to compute it with "
            f"convtranspose")
    own = getattr(mx, op)
    if ndim == 1:
        stride, padding, dilation, output_padding = (stride[0], padding[0], dilation[0],
                                                     output_padding[0])
    return own(input, weight, stride=stride, padding=padding, dilation=dilation,
               output_padding=output_padding, groups=groups, stream=stream)


def _probe_dtype(dtype: Any) -> np.dtype:
    """A NumPy stand-in of an MLX dtype's kind for validation (bfloat16 checks as float32)."""
    name = _dtype_name(dtype)
    if name == "bfloat16":
        return np.dtype(np.float32)
    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype(np.complex64)  # any non-float kind: spec_for names the problem


def conv_transpose1d(input: mx.array, weight: mx.array, /, stride: IntOrTuple = 1,
                     padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                     output_padding: IntOrTuple = 0, groups: int = 1, *,
                     stream: Any = None) -> mx.array:
    """`mx.conv_transpose1d`, computed by convtranspose. input (N, W, C_in), weight
    (C_out, kW, C_in/groups)."""
    return _conv_transpose(1, input, weight, stride, padding, dilation, output_padding,
                           groups, stream)


def conv_transpose2d(input: mx.array, weight: mx.array, /, stride: IntOrTuple = 1,
                     padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                     output_padding: IntOrTuple = 0, groups: int = 1, *,
                     stream: Any = None) -> mx.array:
    """`mx.conv_transpose2d`, computed by convtranspose. input (N, H, W, C_in), weight
    (C_out, kH, kW, C_in/groups)."""
    return _conv_transpose(2, input, weight, stride, padding, dilation, output_padding,
                           groups, stream)


def conv_transpose3d(input: mx.array, weight: mx.array, /, stride: IntOrTuple = 1,
                     padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                     output_padding: IntOrTuple = 0, groups: int = 1, *,
                     stream: Any = None) -> mx.array:
    """`mx.conv_transpose3d`, computed by convtranspose (groups work here, unlike MLX).

    input (N, D, H, W, C_in), weight (C_out, kD, kH, kW, C_in/groups)."""
    return _conv_transpose(3, input, weight, stride, padding, dilation, output_padding,
                           groups, stream)


def _as_tuple(value: Any, ndim: int) -> Any:
    return (value,) * ndim if isinstance(value, int) else value


class _ConvTransposeNd(nn.Module):
    """The shared body of the layers; parameters `weight` (C_out, *kernel, C_in/groups)
    and, with bias=True, `bias` (C_out,), initialised as MLX does."""

    _ndim = 3

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple,
                 stride: IntOrTuple = 1, padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                 output_padding: IntOrTuple = 0, bias: bool = True, groups: int = 1):
        super().__init__()
        name = type(self).__name__
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"{name}: 'groups' must be an int >= 1, got {groups!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"{name}: 'groups'={groups} must divide both in_channels={in_channels} and "
                f"out_channels={out_channels}")
        kernel = _as_tuple(kernel_size, self._ndim)
        if len(tuple(kernel)) != self._ndim:
            raise ValueError(f"{name}: 'kernel_size' must be an int or a tuple of "
                             f"{self._ndim} ints, got {kernel_size!r}")
        # MLX's scale 1/sqrt(C_in * prod(kernel)), per group when groups > 1 (as nn.Conv*).
        scale = math.sqrt(1 / (in_channels // groups * math.prod(kernel)))
        self.weight = mx.random.uniform(low=-scale, high=scale,
                                        shape=(out_channels, *kernel, in_channels // groups))
        if bias:
            self.bias = mx.zeros((out_channels,))
        if self._ndim == 1:
            self.padding, self.dilation, self.stride = padding, dilation, stride
            self.output_padding = output_padding
        else:  # as MLX: ints become tuples, except dilation
            self.padding = _as_tuple(padding, self._ndim)
            self.stride = _as_tuple(stride, self._ndim)
            self.dilation = dilation
            self.output_padding = _as_tuple(output_padding, self._ndim)
        self.groups = groups

    def _extra_repr(self) -> str:
        kernel = tuple(self.weight.shape[1:-1])
        kernel_repr = kernel[0] if self._ndim == 1 else kernel
        return (f"{self.weight.shape[-1] * self.groups}, {self.weight.shape[0]}, "
                f"kernel_size={kernel_repr}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, output_padding={self.output_padding}, "
                f"groups={self.groups}, bias={'bias' in self}")

    def __call__(self, x: mx.array) -> mx.array:
        y = _conv_transpose(self._ndim, x, self.weight, self.stride, self.padding,
                            self.dilation, self.output_padding, self.groups, None)
        if "bias" in self:
            y = y + self.bias
        return y


class ConvTranspose1d(_ConvTransposeNd):
    """`mlx.nn.ConvTranspose1d` computed by convtranspose, plus `groups`.
    Input (N, L, C_in) -> (N, L_out, C_out)."""

    _ndim = 1


class ConvTranspose2d(_ConvTransposeNd):
    """`mlx.nn.ConvTranspose2d` computed by convtranspose, plus `groups`.
    Input (N, H, W, C_in) -> (N, H_out, W_out, C_out)."""

    _ndim = 2


class ConvTranspose3d(_ConvTransposeNd):
    """`mlx.nn.ConvTranspose3d` computed by convtranspose, plus `groups` (MLX's own 3-D
    transposed convolution has none). Input (N, D, H, W, C_in) -> (N, D', H', W', C_out)."""

    _ndim = 3


__all__ = ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "build_extension",
           "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "extension_error"]
