"""Builds the optional compiled kernel (convtranspose._native).

It is `optional`: where no C++ compiler is found, the install still succeeds and the
package runs on its NumPy/BLAS kernels (slower; `convtranspose.native_isa()` says None).
"""

from setuptools import Extension, setup

native = Extension(
    "convtranspose._native",
    sources=[f"src/convtranspose/csrc/{name}.cpp"
             for name in ("module", "correlate_avx512", "correlate_avx2", "correlate_generic")],
    depends=["src/convtranspose/csrc/correlate.hpp", "src/convtranspose/csrc/correlate_api.h",
             "src/convtranspose/csrc/pool.hpp"],
    language="c++",
    # -O3 unrolls the register blocks; -ffp-contract=fast fuses multiply-adds. No
    # -march: each instruction set is compiled in its own file and chosen at run time.
    # -pthread: the pool's worker threads (csrc/pool.hpp).
    extra_compile_args=["-O3", "-std=c++17", "-ffp-contract=fast", "-fno-math-errno",
                        "-pthread"],
    extra_link_args=["-pthread"],
    optional=True,
)

setup(ext_modules=[native])
