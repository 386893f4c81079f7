"""Ours against torch.nn.functional.conv_transpose1d/2d/3d (layouts converted in conftest).

PyTorch only defines part of what MLX accepts: it rejects negative padding, negative
output_padding, and output_padding >= max(stride, dilation) on an axis. Those cases are
compared against MLX and the reference elsewhere; here only the cases PyTorch defines run,
and a test checks that PyTorch does reject the others (so that the filter below is honest).
PyTorch is the comparison for groups in 3-D, which MLX refuses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import Case, all_cases, magnitude_ref, out_size, reaches_output

import convtranspose as ct

FUNCS = {1: ct.conv_transpose1d, 2: ct.conv_transpose2d, 3: ct.conv_transpose3d}
DTYPES = ["float16", "bfloat16", "float32", "float64"]


def torch_defines(case: Case) -> bool:
    for s, p, d, op in zip(case.per_axis("stride"), case.per_axis("padding"),
                           case.per_axis("dilation"), case.per_axis("output_padding")):
        if p < 0 or op < 0 or op >= max(s, d):
            return False
    return True


def _random_torch_cases(count: int, seed: int = 11) -> list[Case]:
    """Random combinations inside what PyTorch defines, groups in every dimension."""
    rng = np.random.default_rng(seed)
    cases: list[Case] = []
    while len(cases) < count:
        ndim = int(rng.integers(1, 4))
        groups = int(rng.choice([1, 2, 3]))
        cin_g, cout_g = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        in_sp = tuple(int(v) for v in rng.integers(1, 6, ndim))
        kernel = tuple(int(v) for v in rng.integers(1, 5, ndim))
        stride = tuple(int(v) for v in rng.integers(1, 4, ndim))
        dilation = tuple(int(v) for v in rng.integers(1, 4, ndim))
        padding = tuple(int(v) for v in rng.integers(0, 3, ndim))
        out_pad = tuple(int(rng.integers(0, max(s, d))) for s, d in zip(stride, dilation))
        sizes = [out_size(*a) for a in zip(in_sp, kernel, stride, padding, dilation, out_pad)]
        if min(sizes) < 1:
            continue
        case = Case(f"tcombo{len(cases)}", int(rng.integers(1, 3)), in_sp, cin_g * groups,
                    cout_g * groups, kernel, stride, padding, dilation, out_pad, groups)
        if not reaches_output(case):
            continue  # every contribution falls outside: a comparison of zeros
        cases.append(case)
    return cases


GRID = [c for c in all_cases() if torch_defines(c)]
COMBOS = _random_torch_cases(60)
CASES = GRID + COMBOS


def _operands(case, rng, random_array, dtype):
    return (random_array(rng, case.input_shape, dtype),
            random_array(rng, case.weight_shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_torch(case, dtype, rng, random_array, torch_conv_transpose, assert_close):
    x, w = _operands(case, rng, random_array, dtype)
    ours = FUNCS[case.ndim](x, w, **case.kwargs)
    theirs, their_dtype = torch_conv_transpose(x, w, **case.kwargs)
    assert ours.shape == theirs.shape == case.output_shape, case.id
    assert ours.dtype.name == their_dtype == dtype
    if case.batch:
        assert np.abs(theirs).max() > 0, case.id  # not a comparison of zeros
    assert_close(ours, theirs, dtype, magnitude_ref(x, w, **case.kwargs),
                 what=f"{case.id} vs torch")


def test_the_torch_cases_cover_groups_in_3d_and_the_edges():
    assert sum(1 for c in CASES if c.ndim == 3 and c.groups > 1) >= 10
    assert any(c.groups == c.c_in and c.ndim == 3 for c in CASES)  # depthwise 3-D
    assert any(c.groups > 1 and c.c_in // c.groups > 1 and c.ndim == 3 for c in CASES)
    # output_padding >= stride, allowed by PyTorch when dilation is larger
    assert any(any(op >= s for op, s in zip(c.per_axis("output_padding"),
                                            c.per_axis("stride"))) for c in CASES)
    assert any(max(c.per_axis("dilation")) > 1 for c in CASES)


@pytest.mark.parametrize("case", [c for c in all_cases() if not torch_defines(c)][:12],
                         ids=lambda c: c.id)
def test_torch_rejects_what_the_filter_leaves_out(case, rng, random_array,
                                                  torch_conv_transpose):
    x, w = _operands(case, rng, random_array, "float32")
    with pytest.raises(RuntimeError):
        torch_conv_transpose(x, w, **case.kwargs)
    # ... while we compute it (the reference and MLX check the values elsewhere).
    assert FUNCS[case.ndim](x, w, **case.kwargs).shape == case.output_shape


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_3d_grouped_matches_torch_in_either_memory_format(memory_format, rng, random_array,
                                                          assert_close):
    # The layout PyTorch users hold for channels-last volumes is a zero-copy view of ours.
    case = Case("cl3d", 2, (3, 4, 5), 6, 4, (3, 2, 3), stride=(2, 1, 2), padding=1,
                dilation=(1, 2, 1), output_padding=(1, 1, 0), groups=2)
    x, w = _operands(case, rng, random_array, "float32")
    xt = torch.from_numpy(x).permute(0, 4, 1, 2, 3)
    assert xt.is_contiguous(memory_format=torch.channels_last_3d)
    xt = xt.contiguous(memory_format=memory_format)
    wg = w.reshape(2, 2, 3, 2, 3, 3).transpose(0, 5, 1, 2, 3, 4).reshape(6, 2, 3, 2, 3)
    with torch.no_grad():
        y = F.conv_transpose3d(xt, torch.from_numpy(np.ascontiguousarray(wg)), **case.kwargs)
    theirs = y.permute(0, 2, 3, 4, 1).numpy()
    ours = ct.conv_transpose3d(x, w, **case.kwargs)
    assert_close(ours, theirs, np.float32, magnitude_ref(x, w, **case.kwargs))
