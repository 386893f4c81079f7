"""weight_from_torch / weight_to_torch: layout, groups, inverses, errors, and a numerical
check against torch's conv_transpose with converted weights."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import convtranspose as ct

RNG = np.random.default_rng(1234)
TORCH_OPS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
OUR_OPS = {1: ct.conv_transpose1d, 2: ct.conv_transpose2d, 3: ct.conv_transpose3d}


def torch_weight(ndim: int, c_in: int, c_out: int, groups: int, k: int = 3) -> np.ndarray:
    kernel = tuple(k - i for i in range(ndim))  # anisotropic, so axis mix-ups show
    return RNG.standard_normal((c_in, c_out // groups, *kernel)).astype(np.float32)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_layout_matches_the_index_identity(ndim: int, groups: int) -> None:
    # W_torch[g*Cin_g + i, o, *k] == W_ours[g*Cout_g + o, *k, i], element by element.
    c_in, c_out = 2 * groups, 3 * groups
    wt = torch_weight(ndim, c_in, c_out, groups)
    ours = ct.weight_from_torch(wt, groups=groups)
    cin_g, cout_g = c_in // groups, c_out // groups
    kernel = wt.shape[2:]
    assert ours.shape == (c_out, *kernel, cin_g)
    for g, i, o in itertools.product(range(groups), range(cin_g), range(cout_g)):
        for k in itertools.product(*(range(n) for n in kernel)):
            assert ours[(g * cout_g + o, *k, i)] == wt[(g * cin_g + i, o, *k)]


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_round_trips_are_exact(ndim: int, groups: int) -> None:
    wt = torch_weight(ndim, 4, 8, groups)
    back = ct.weight_to_torch(ct.weight_from_torch(wt, groups), groups)
    assert back.dtype == wt.dtype and np.array_equal(back, wt)
    ours = ct.weight_from_torch(wt, groups)
    again = ct.weight_from_torch(ct.weight_to_torch(ours, groups), groups)
    assert np.array_equal(again, ours)


@settings(max_examples=40, deadline=None)
@given(ndim=st.integers(1, 3), groups=st.integers(1, 4), cin_g=st.integers(1, 3),
       cout_g=st.integers(1, 3), k=st.integers(1, 3))
def test_round_trip_property(ndim: int, groups: int, cin_g: int, cout_g: int, k: int) -> None:
    rng = np.random.default_rng(ndim * 1000 + groups * 100 + cin_g * 10 + cout_g + k)
    wt = rng.standard_normal((groups * cin_g, cout_g, *(k,) * ndim))
    ours = ct.weight_from_torch(wt, groups)
    assert ours.shape == (groups * cout_g, *(k,) * ndim, cin_g)
    assert np.array_equal(ct.weight_to_torch(ours, groups), wt)


CASES = [
    # ndim, c_in, c_out, groups, stride, padding, dilation, output_padding
    (1, 4, 6, 2, 2, 1, 1, 1),
    (1, 3, 3, 3, 3, 0, 2, 2),
    (2, 4, 6, 1, 2, 1, 1, 1),
    (2, 6, 4, 2, (2, 1), (1, 0), (1, 2), (1, 0)),
    (3, 4, 4, 2, 2, 1, 1, 1),
    (3, 2, 6, 2, (1, 2, 2), 0, (2, 1, 1), (0, 1, 0)),
    (3, 3, 3, 3, 2, 1, 1, 0),
]


@pytest.mark.parametrize("case", CASES)
def test_converted_weights_reproduce_torch(case) -> None:
    ndim, c_in, c_out, groups, stride, padding, dilation, out_pad = case
    wt = torch_weight(ndim, c_in, c_out, groups)
    spatial = (5, 4, 6)[:ndim]
    x_torch = RNG.standard_normal((2, c_in, *spatial)).astype(np.float32)
    expected = TORCH_OPS[ndim](torch.from_numpy(x_torch), torch.from_numpy(wt), stride=stride,
                               padding=padding, output_padding=out_pad, groups=groups,
                               dilation=dilation).numpy()
    x_ours = np.moveaxis(x_torch, 1, -1)  # channels last
    got = OUR_OPS[ndim](x_ours, ct.weight_from_torch(wt, groups), stride, padding, dilation,
                        out_pad, groups)
    got_cf = np.moveaxis(got, -1, 1)
    assert got_cf.shape == expected.shape
    np.testing.assert_allclose(got_cf, expected, rtol=1e-4, atol=1e-4)
    # The other direction: our weight, converted for torch, gives our result.
    ours_w = RNG.standard_normal(ct.weight_from_torch(wt, groups).shape).astype(np.float32)
    via_torch = TORCH_OPS[ndim](torch.from_numpy(x_torch),
                                torch.from_numpy(ct.weight_to_torch(ours_w, groups)),
                                stride=stride, padding=padding, output_padding=out_pad,
                                groups=groups, dilation=dilation).numpy()
    direct = OUR_OPS[ndim](x_ours, ours_w, stride, padding, dilation, out_pad, groups)
    np.testing.assert_allclose(np.moveaxis(direct, -1, 1), via_torch, rtol=1e-4, atol=1e-4)


def test_state_dict_of_a_torch_module_round_trips() -> None:
    torch.manual_seed(0)
    layer = torch.nn.ConvTranspose3d(4, 6, kernel_size=3, stride=2, padding=1,
                                     output_padding=1, groups=2)
    w = ct.weight_from_torch(layer.weight, groups=2)  # a Parameter with requires_grad
    bias = layer.bias.detach().numpy()
    x = RNG.standard_normal((1, 4, 3, 4, 5)).astype(np.float32)
    with torch.no_grad():
        expected = layer(torch.from_numpy(x)).numpy()
    got = ct.conv_transpose3d(np.moveaxis(x, 1, -1), w, 2, 1, 1, 1, 2) + bias
    np.testing.assert_allclose(np.moveaxis(got, -1, 1), expected, rtol=1e-4, atol=1e-5)
    fresh = torch.nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
    fresh.load_state_dict({"weight": torch.from_numpy(ct.weight_to_torch(w, groups=2)),
                           "bias": torch.from_numpy(bias)})
    assert torch.equal(fresh.weight, layer.weight)


def test_input_types_dtypes_and_no_aliasing() -> None:
    wt = torch_weight(2, 2, 4, 1)
    before = wt.copy()
    out = ct.weight_from_torch(wt)
    assert np.array_equal(wt, before)  # never mutate the caller's array
    assert isinstance(out, np.ndarray) and out.flags.c_contiguous
    out[...] = 0
    assert np.array_equal(wt, before)
    # Lists, float16/float64, torch tensors (also bfloat16) keep their dtype.
    assert np.array_equal(ct.weight_from_torch(wt.tolist()), ct.weight_from_torch(wt))
    for dt in (np.float16, np.float64, ml_dtypes.bfloat16):
        res = ct.weight_from_torch(wt.astype(dt))
        assert res.dtype == np.dtype(dt)
        assert np.array_equal(res.astype(np.float64),
                              ct.weight_from_torch(wt.astype(dt).astype(np.float64)))
    t_bf16 = torch.from_numpy(wt).to(torch.bfloat16)
    res = ct.weight_from_torch(t_bf16)
    assert res.dtype == np.dtype(ml_dtypes.bfloat16)
    assert np.array_equal(res.astype(np.float32),
                          ct.weight_from_torch(t_bf16.float().numpy()))
    # A permutation that is a no-op in memory must still return a copy, not a view.
    trivial = np.arange(4.0).reshape(4, 1, 1)  # C_in=4, C_out=1, k=1 -> (1, 1, 4)
    res = ct.weight_from_torch(trivial)
    res[...] = -1
    assert np.array_equal(trivial.ravel(), np.arange(4.0))
    res = ct.weight_to_torch(trivial.reshape(1, 1, 4).copy())
    assert not np.may_share_memory(res, trivial)
    # Non-contiguous views are read correctly.
    big = torch_weight(3, 4, 4, 1)
    view = big[1:, :, ::-1, ::-1]
    assert np.array_equal(ct.weight_from_torch(view), ct.weight_from_torch(view.copy()))
    fortran = np.asfortranarray(big)
    assert np.array_equal(ct.weight_from_torch(fortran), ct.weight_from_torch(big))


@pytest.mark.parametrize("fn", [ct.weight_from_torch, ct.weight_to_torch])
def test_impossible_shapes_and_settings_are_refused(fn) -> None:
    name = fn.__name__
    with pytest.raises(ValueError, match=rf"{name}: 'w' must have 3, 4 or 5 dimensions.*"
                                         r"\(3, 4\)"):
        fn(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="with 6"):
        fn(np.zeros((2, 2, 1, 1, 1, 1)))
    with pytest.raises(ValueError, match=r"'groups'=3 must divide axis 0 of 'w'.*=4"):
        fn(np.zeros((4, 2, 3)), groups=3)
    with pytest.raises(ValueError, match="'groups' must be >= 1, got 0"):
        fn(np.zeros((4, 2, 3)), groups=0)
    for bad in (1.0, True, "2", None):
        with pytest.raises(TypeError, match="'groups' must be an int"):
            fn(np.zeros((4, 2, 3)), groups=bad)
    with pytest.raises(ValueError, match="zero-size axis"):
        fn(np.zeros((4, 2, 0)))
    with pytest.raises(TypeError, match="got None"):
        fn(None)
    with pytest.raises(TypeError, match="rectangular"):
        fn([[[1.0, 2.0]], [[1.0]]])
