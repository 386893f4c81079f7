"""An installed convtranspose, checked from outside the source tree (cibuildwheel's
test-command, and .ci/run's installs without a compiler):

    python .ci/wheel_check.py            the compiled kernel must be there
    python .ci/wheel_check.py --numpy    it must not be (the no-compiler install)

Each time a small 3-D call, on the path in use, matches the NumPy `scatter` algorithm.
"""

import sys

import numpy as np

import convtranspose as ct

want_native = "--numpy" not in sys.argv[1:]
isa = ct.native_isa()
if (isa is not None) != want_native:
    sys.exit(f"wheel_check: native_isa() is {isa!r}, expected "
             f"{'a compiled kernel' if want_native else 'None (NumPy path)'}")

rng = np.random.default_rng(0)
x = rng.standard_normal((1, 4, 5, 6, 8)).astype(np.float32)
w = rng.standard_normal((16, 3, 3, 3, 8)).astype(np.float32)
got = ct.conv_transpose3d(x, w, stride=2, padding=1)
ref = ct.run_plan(ct.plan(x.shape, w.shape, stride=2, padding=1, algorithm="scatter"), x, w)
if got.shape != ref.shape or not np.allclose(got, ref, rtol=1e-4, atol=1e-4):
    sys.exit(f"wheel_check: the call differs from the NumPy path by "
             f"{np.max(np.abs(got - ref)) if got.shape == ref.shape else 'shape'}")
print(f"wheel_check: {ct.__file__}: native_isa() = {isa!r}, a {got.shape} call matches")
