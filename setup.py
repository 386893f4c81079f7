"""Builds the optional compiled kernel (convtranspose._native).

It is `optional`: where no C++ compiler works, the install still succeeds, says so in one
line, and the package runs on its NumPy/BLAS kernels (`convtranspose.native_isa()` is None).

The kernel (csrc/correlate.hpp, which includes one header per operation: forward.hpp,
grad_weight.hpp, conversions.hpp, and those they share) is compiled once per instruction
set, each in three parts (CT_PART: the float32 correlation, the float64 one, the rest)
that compile in parallel: on 2 cores the three units took 3.5-5.5 min one after another
(291 s of CPU). Which instruction sets, from CONVTRANSPOSE_ISAS at build time:
  host (default)  the best one this machine runs, alone (avx2 here: ~70 s of CPU, where
                  all three take ~230 s)
  all             every one this architecture has: release wheels (see [tool.cibuildwheel]
                  in pyproject.toml), CI, and kernel work, whose tests then run each set
                  this CPU has and which compile-checks the ones it lacks
  a list          e.g. "avx2,generic"
The module picks the best compiled set the CPU supports at import; where it supports none
(a `host` build moved to an older CPU), the package runs on NumPy, as without a compiler.

Why setuptools and not meson-python or scikit-build-core with ninja: the build is five
compiler calls per instruction set and one link; what ninja would add here is parallel
compilation, which `_ParallelBuildExt` does in ~40 lines, and the other backends would
download ninja and meson or CMake (several MB) into every isolated build, plus their own
no-compiler handling for an extension that must stay optional. Measured, 2 cores, loaded
machine: the compiler calls are ~100% of the build; setuptools itself a few seconds.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.modified import newer_group

CSRC = "src/convtranspose/csrc"
X86_ISAS = ("avx512", "avx2")
PARTS = (1, 2, 3)  # see CT_PART in correlate.hpp


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "x64")


def _host_isas() -> list[str]:
    """The best instruction set this machine runs (module.cpp's `supported` rule); every
    x86 set where the CPU's flags cannot be read (not Linux)."""
    if not _x86():
        return ["generic"]
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f
                          if line.startswith("flags")), set())
    except OSError:
        flags = set()
    if not flags:
        return [*X86_ISAS, "generic"]
    if {"avx512f", "avx512vl", "avx512dq", "f16c"} <= flags:
        return ["avx512"]
    if {"avx2", "fma", "f16c"} <= flags:
        return ["avx2"]
    return ["generic"]


def selected_isas() -> list[str]:
    known = [*X86_ISAS, "generic"] if _x86() else ["generic"]
    choice = os.environ.get("CONVTRANSPOSE_ISAS", "host").strip().lower()
    if choice == "host":
        return _host_isas()
    if choice == "all":
        return known
    wanted = [name.strip() for name in choice.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        raise SystemExit(f"CONVTRANSPOSE_ISAS={choice!r}: use 'host', 'all' or a list of "
                         f"{', '.join(known)} (this is {platform.machine()})")
    return [name for name in known if name in wanted]  # best first, as module.cpp lists


NO_KERNEL = (
    "convtranspose: installed WITHOUT its compiled kernel ({why}); it runs on NumPy instead, "
    "1.4-3.2x slower on our benchmark layers (convtranspose.native_isa() is None). To get "
    "the kernel: install a C++17 compiler (e.g. `apt install g++`, `xcode-select --install`), "
    "then pip install again.")


def _tell_user(line: str) -> None:
    """One line where the user sees it: pip hides a build's output unless -v, so also the
    terminal itself where there is one."""
    print(line, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write("\n" + line + "\n")  # off pip's progress line
    except OSError:
        pass


class _ParallelBuildExt(build_ext):
    """Compiles the extension's units in parallel (one compiler call per unit and part,
    longest first), then links them; an optional extension that fails says so once."""

    def build_extension(self, ext: Extension) -> None:
        try:
            self._build_parallel(ext)
        except Exception as err:
            if ext.optional:
                why = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                _tell_user(NO_KERNEL.format(why=why[:160]))
            raise

    def _build_parallel(self, ext: Extension) -> None:
        ext_path = self.get_ext_fullpath(ext.name)
        units = ext._units  # [(source, macros, object folder)]
        # Which sets the built extension has: another CONVTRANSPOSE_ISAS rebuilds it.
        stamp = os.path.join(self.build_temp, "convtranspose-isas")
        isas = ",".join(ext._isas)
        built = open(stamp).read() if os.path.exists(stamp) else None
        if built == isas and not (self.force or newer_group(
                [u[0] for u in units] + ext.depends, ext_path, "newer")):
            return

        def compile_one(unit):
            source, macros, folder = unit
            return self.compiler.compile(
                [source], output_dir=os.path.join(self.build_temp, folder), macros=macros,
                include_dirs=ext.include_dirs, debug=self.debug,
                extra_postargs=ext.extra_compile_args, depends=ext.depends)

        jobs = int(os.environ.get("CONVTRANSPOSE_BUILD_JOBS", "0")) or len(_usable_cpus())
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            objects = [o for objs in pool.map(compile_one, units) for o in objs]
        self.compiler.link_shared_object(
            objects, ext_path, libraries=self.get_libraries(ext),
            library_dirs=ext.library_dirs, runtime_library_dirs=ext.runtime_library_dirs,
            extra_postargs=ext.extra_link_args, export_symbols=self.get_export_symbols(ext),
            debug=self.debug, build_temp=self.build_temp, target_lang="c++")
        with open(stamp, "w") as f:
            f.write(isas)


def _usable_cpus() -> set[int] | range:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # macOS
        return range(os.cpu_count() or 1)


def _native_extension() -> Extension:
    isas = selected_isas()
    # Longest first, so that the short ones fill the cores at the end: avx512's parts,
    # avx2's, generic's (the float parts before the rest), the module last.
    units = [(f"{CSRC}/correlate_{isa}.cpp", [("CT_PART", str(part))], f"{isa}-{part}")
             for isa in isas for part in PARTS]
    module_macros = [("CT_WITH_ISAS", None)] + [(f"CT_WITH_{isa.upper()}", None) for isa in isas]
    units.append((f"{CSRC}/module.cpp", module_macros, "module"))
    ext = Extension(
        "convtranspose._native",
        sources=sorted({u[0] for u in units}),  # for sdists and up-to-date checks
        # Every header in csrc/: a change to any rebuilds the extension.
        depends=sorted(glob.glob(f"{CSRC}/*.h") + glob.glob(f"{CSRC}/*.hpp")),
        language="c++",
        # -O3 unrolls the register blocks; -ffp-contract=fast fuses multiply-adds. No
        # -march: each instruction set is compiled in its own file and chosen at run time.
        # -pthread: the pool's worker threads (csrc/pool.hpp). -g0: Python's own CFLAGS
        # carry -g, which made a 28.5 MB extension (about 4 MB without) and took a quarter
        # of the compile time.
        extra_compile_args=["-O3", "-std=c++17", "-ffp-contract=fast", "-fno-math-errno",
                            "-pthread", "-g0"],
        extra_link_args=["-pthread"],
        # CONVTRANSPOSE_REQUIRE_NATIVE=1 (release wheels): a failed build fails the install.
        optional=os.environ.get("CONVTRANSPOSE_REQUIRE_NATIVE", "") in ("", "0"),
    )
    ext._units, ext._isas = units, isas
    return ext


setup(ext_modules=[_native_extension()], cmdclass={"build_ext": _ParallelBuildExt})
