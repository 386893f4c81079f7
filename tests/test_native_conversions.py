"""The compiled kernel's conversions and its binding: the packed weight layout, float16 and
bfloat16 widened to float32 bit for bit, and the C binding that fills each job's struct by
field name (csrc/module.cpp)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from convtranspose import _native_kernel as native


def test_binding_fills_each_job_by_field_name():
    """The binding (csrc/module.cpp) fills a job's C struct field by field from a dict of
    its names: a missing field, a name the struct lacks, an array of the wrong length or a
    value that is not an int is an error naming it; keys need not be interned."""
    a = np.zeros(64, np.float32)
    table = np.zeros((1, 4), np.int64)
    pack = {"itemsize": 4, "src": native._native.address(a),
            "table": native._native.address(table), "taps": 1, "cols": 4, "rows": 1,
            "row_stride": 1, "padded": 16, "chunk": 16, "dst": native._native.address(a)}
    assert native._native.pack_call(pack) is not None
    built = {"".join(("ro", "ws")) if k == "rows" else k: v for k, v in pack.items()}
    assert native._native.pack_call(built) is not None
    with pytest.raises(TypeError, match="pack: missing field 'rows'"):
        native._native.pack_call({k: v for k, v in pack.items() if k != "rows"})
    with pytest.raises(TypeError, match="pack: unknown field 'colums'"):
        native._native.pack_call({**pack, "colums": 4})
    with pytest.raises(TypeError, match="pack: field 'taps' takes ints"):
        native._native.pack_call({**pack, "taps": 1.0})
    with pytest.raises(TypeError, match="takes a dict of the fields of a PackJob"):
        native._native.pack_call(tuple(pack.values()))
    with pytest.raises(TypeError, match="correlate: field 'xs' takes a tuple or list of 4"):
        native._native.correlate_call({"itemsize": 4, "xs": (1, 2, 3)})


def _c_enum(header: str, prefix: str) -> dict[str, int]:
    """The members `PREFIX_NAME = value,` of the C enums in `header`, by NAME."""
    return {m[1]: int(m[2])
            for m in re.finditer(rf"^\s*{prefix}(\w+)\s*=\s*(-?\d+)\s*,", header, re.M)}


def test_python_values_of_the_c_enums_are_those_of_correlate_api_h():
    """Python passes the kernel's modes, output kinds and grad_weight layouts by number:
    each must be the value csrc/correlate_api.h gives it, or a job would silently run in
    another mode."""
    header = (Path(__file__).resolve().parents[1] / "src" / "convtranspose" / "csrc"
              / "correlate_api.h").read_text(encoding="utf-8")
    assert {m.name: int(m) for m in native.Mode} == _c_enum(header, "CT_MODE_")
    assert {"NONE": native.HALF_NONE, "F16": native.HALF_F16,
            "BF16": native.HALF_BF16} == _c_enum(header, "CT_HALF_")
    layout = native.GradWeightLayout
    c_layouts = _c_enum(header, "CT_GW_")
    assert {"ALONG_COUT": int(layout.ALONG_OUT), "ALONG_CIN": int(layout.ALONG_IN),
            "DEPTHWISE": int(layout.DEPTHWISE)} == c_layouts
    # WIDE and PLANAR are Python's alone (built on the three, or the planar
    # kernel's own entry point): no C value may mean them.
    assert not ({int(layout.WIDE), int(layout.PLANAR)}
                & set(c_layouts.values()))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("transposed,scattered", [(False, False), (True, False), (True, True)],
                         ids=["rows-contiguous", "rows-strided", "rows-strided-cols-permuted"])
@pytest.mark.parametrize("cols", [1, 7, 16, 70, 130])
def test_pack_columns_gathers_the_documented_layout(dtype, transposed, scattered, cols, rng):
    """Element (tap, r, col) = w.flat-by-strides[table[tap, col] + r * row_stride], columns
    padded with zeros to whole vectors, cut into chunks [tap][r][column]: checked against
    a NumPy gather, from a strided source either way round, with the columns adjacent in
    the source (copied as runs) or not."""
    taps, rows = 3, 21
    lanes, max_vectors = native.layout(np.dtype(dtype).itemsize)
    base = rng.standard_normal((cols + 3, taps, rows * 2)).astype(dtype)
    src = base[1:cols + 1, :, ::2]  # (cols, taps, rows), not contiguous
    if transposed:  # rows strided, columns adjacent
        src = np.ascontiguousarray(src.transpose(1, 2, 0)).transpose(2, 0, 1)
    s_col, s_tap, s_row = native.element_strides(src)
    order = rng.permutation(cols) if scattered else np.arange(cols)
    table = np.arange(taps)[:, None] * s_tap + order[None, :] * s_col
    padded = -(-cols // lanes) * lanes
    want = np.zeros((taps, rows, padded), dtype)
    want[..., :cols] = src.transpose(1, 2, 0)[..., order]
    # The forward's chunks (130 float32 columns on AVX-512: 9 vectors as 3 + 3 + 3), and
    # grad_weight's (4 + 4 + 1), which `unpack_grad_weight` reads back.
    forward = native.chunk_columns(cols, rows, np.dtype(dtype).itemsize)
    widest = lanes * max_vectors
    assert forward <= widest and -(-padded // forward) == -(-padded // widest)
    for chunk in (forward, widest):
        packed = native.pack_columns(src, table, rows, s_row, chunk=chunk)
        expect = np.concatenate([want[..., c:c + chunk].ravel() for c in range(0, padded, chunk)])
        np.testing.assert_array_equal(packed, expect)
    back = np.empty((padded, taps, rows), dtype)  # the packed layout read back
    native.unpack_grad_weight(packed, back, taps, rows, padded, 0, taps)
    np.testing.assert_array_equal(back, want.transpose(2, 0, 1))


def test_widen_half_converts_every_bit_pattern_exactly(isa):
    """A float16/bfloat16 input converted for the kernel (F16C, or software on the portable
    build): every one of the 65536 bit patterns gives NumPy's / ml_dtypes' float32, bit
    for bit (nans: a nan; F16C quiets signalling ones)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        src = bits.view(dtype)
        out = np.empty(bits.size, np.float32)
        native.widen_half(src, out)
        want = src.astype(np.float32)
        nan = np.isnan(want)
        np.testing.assert_array_equal(out.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
        assert np.isnan(out[nan]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("w,s,c", [(10, 2, 3), (9, 4, 1), (3, 4, 5), (1, 3, 2)])
def test_split_residues_lays_each_rows_residues_in_zero_padded_stretches(dtype, w, s, c, rng):
    rows_in = rng.standard_normal((5, w, c)).astype(dtype)
    left, stretch = 2, 2 + -(-w // s) + 3
    out = np.full((5, s, stretch, c), np.nan, dtype)
    native.split_residues(rows_in, out, 0, 3, left)  # rows 0-2 here, the rest after
    assert np.isnan(out[3:]).all()
    native.split_residues(rows_in, out, 3, 5, left)
    want = np.zeros_like(out)
    for r in range(s):
        pixels = rows_in[:, r::s]
        want[:, r, left:left + pixels.shape[1]] = pixels
    np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="split_residues"):
        native.split_residues(rows_in, out[:2], 0, 5, left)  # out too short for the rows


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows,cols", [(3, 16), (37, 80), (20, 160)])
def test_unpack_grad_weight_inverts_the_packed_layout(dtype, rows, cols, rng):
    # The packed sums: chunks of `chunk` columns, each [tap][row][column of the chunk].
    lanes, max_vectors = native.layout(np.dtype(dtype).itemsize)
    chunk, taps = lanes * max_vectors, 5  # 160 columns: two chunks or more on every build
    sums = rng.standard_normal((taps, rows, cols)).astype(dtype)  # [tap][row][column]
    packed = np.concatenate([sums[..., c0:c0 + chunk].ravel()
                             for c0 in range(0, cols, chunk)])
    want = sums.transpose(2, 0, 1)  # gw (C_out/g, taps, C_in/g): rows are C_in/g
    gw = np.full(want.shape, np.nan, dtype)
    native.unpack_grad_weight(packed, gw, taps, rows, cols, 0, 2)  # taps 0-1 here
    assert np.isnan(gw[:, 2:]).all()
    native.unpack_grad_weight(packed, gw, taps, rows, cols, 2, taps)
    np.testing.assert_array_equal(gw, want)
    with pytest.raises(ValueError, match="unpack_grad_weight"):
        native.unpack_grad_weight(packed[:-1], gw, taps, rows, cols, 0, taps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", range(1, 10))
def test_planar_rows_lays_each_channel_and_residue_in_zero_padded_rows(dtype, c, rng):
    """The gradients' planar copy (csrc/module.cpp planar_rows): each channel's W
    residues one row of zeros around its pixels. A residue's c values are transposed in
    registers four pixels at a time (two or three values: 16 at a time); widths with
    every remainder, residues missing the row's last pixels."""
    for res in range(1, 5):
        for w in (1, 3, 4, 7, 16, 17, 33, 66):
            rows, left = 3, 2
            stretch = left + -(-w // res) + 3
            src = rng.standard_normal((rows, w, c)).astype(dtype)
            dst = np.full((rows, c, res, stretch), np.nan, dtype)
            native.planar_rows(src, dst, 0, rows, w, res, left, stretch)
            want = np.zeros_like(dst)
            for r in range(res):
                pixels = src[:, r::res]  # (rows, count, c)
                want[:, :, r, left:left + pixels.shape[1]] = pixels.transpose(0, 2, 1)
            np.testing.assert_array_equal(dst, want, err_msg=f"res {res}, w {w}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [1, 2, 3, 4, 5, 8, 11])
def test_planar_copy_makes_each_channel_an_image_with_zeros_around(dtype, c, rng):
    """The forward's planar copy (`native.planar_copy`): each plane's channels images of
    `height` rows of `pitch`, the pixels from (top, left) on, zeros around; from
    channels-last pixels, contiguous or every other pixel of a wider array."""
    x = rng.standard_normal((2, 3, 5, 19, c)).astype(dtype)
    for source in (x, rng.standard_normal((2, 3, 5, 38, c)).astype(dtype)[:, :, :, ::2]):
        top, left, height, pitch = 1, 3, 8, 25
        item = np.dtype(dtype).itemsize
        out = np.full(native.planar_size(source.shape, height, pitch, item), np.nan, dtype)
        native.planar_copy(source, top, left, height, pitch, out, 2)
        image = native.planar_image(height, pitch, item)
        got = out[:6 * c * image].reshape(6, c, image)[:, :, :height * pitch]
        want = np.zeros((6, c, height, pitch), dtype)
        want[:, :, top:top + 5, left:left + 19] = source.reshape(6, 5, 19, c).transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(got.reshape(want.shape), want)
        assert not out[6 * c * image:].any()  # the tail a run's last vectors read


@pytest.mark.parametrize("shape,left,width", [((2, 3, 4, 7, 3), 1, 10), ((1, 2, 2, 5, 1), 0, 8),
                                              ((2, 8, 60, 700, 3), 2, 705)])  # 8 MiB: pieces
def test_padded_along_w_puts_zeros_around_each_row(shape, left, width, rng):
    """The gradients' W-padded cotangent (`_execute.padded_along_w`): row by row in the
    compiled kernel from a C-contiguous array of the compute dtype, through NumPy from
    any other; the same values either way."""
    from convtranspose import _execute

    a = rng.standard_normal(shape).astype(np.float32)
    want = np.zeros((*shape[:3], width, shape[4]), np.float32)
    want[:, :, :, left:left + shape[3]] = a
    for source in (a, a.astype(np.float64), np.asfortranarray(a)):
        got = _execute.padded_along_w(source, left, width, np.dtype(np.float32), 2)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m", [2, 3, 4, 7])
def test_sum_repeats_adds_each_channels_repeats_in_order(dtype, m, rng):
    """A channel multiplier's grad_input (`_execute.sum_repeats`): each run of m channels
    summed first to last, the bits of NumPy's adds in that order, by the compiled kernel
    in pieces on the threads or (a strided source) by NumPy."""
    from convtranspose import _execute

    a = (rng.standard_normal((3, 5, 700, 4 * m)) * 10.0 ** rng.integers(-3, 4, 4 * m)).astype(dtype)
    want = a[..., 0::m] + a[..., 1::m]
    for j in range(2, m):
        want += a[..., j::m]
    for threads in (1, 2):
        np.testing.assert_array_equal(_execute.sum_repeats(a, m, threads), want)
    strided = np.zeros((3, 5, 1400, 4 * m), dtype)[:, :, ::2]
    strided[...] = a
    np.testing.assert_array_equal(_execute.sum_repeats(strided, m, 2), want)
