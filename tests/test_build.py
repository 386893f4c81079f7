"""The build (setup.py): which instruction sets it compiles, in parallel parts, and what it
ships. Loaded with setuptools.setup replaced, so nothing is compiled here."""

from __future__ import annotations

import importlib.util
import platform
import struct
from pathlib import Path

import pytest
import setuptools

from convtranspose import _native_kernel as native

ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine().lower() in ("x86_64", "amd64", "x64")


def load_setup(monkeypatch, isas: str | None):
    """setup.py as a module, with CONVTRANSPOSE_ISAS set (None: unset), and the
    extension it would build."""
    if isas is None:
        monkeypatch.delenv("CONVTRANSPOSE_ISAS", raising=False)
    else:
        monkeypatch.setenv("CONVTRANSPOSE_ISAS", isas)
    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    spec = importlib.util.spec_from_file_location("convtranspose_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (ext,) = seen["ext_modules"]
    return module, ext


def test_every_instruction_set_in_three_parts_and_the_module_lists_them(monkeypatch):
    _, ext = load_setup(monkeypatch, "all")
    isas = ["avx512", "avx2", "generic"] if X86 else ["generic"]
    parts = [(Path(src).stem, dict(macros).get("CT_PART")) for src, macros, _ in ext._units]
    assert parts[:-1] == [(f"correlate_{i}", p) for i in isas for p in ("1", "2", "3")]
    module_src, module_macros, _ = ext._units[-1]
    assert Path(module_src).name == "module.cpp"
    assert [m for m, _ in module_macros] == ["CT_WITH_ISAS"] + [f"CT_WITH_{i.upper()}"
                                                                 for i in isas]
    # one object folder per unit and part: the same source compiles to several objects
    assert len({folder for *_, folder in ext._units}) == len(ext._units)
    assert "-g0" in ext.extra_compile_args and ext.optional


def test_host_build_is_this_cpus_best_set_plus_generic(monkeypatch):
    setup_module, ext = load_setup(monkeypatch, None)
    host = setup_module.selected_isas()
    assert len(host) == 1 or (X86 and host == ["avx512", "avx2", "generic"])  # flags unread
    assert [Path(src).stem for src, *_ in ext._units[:-1]] == [
        f"correlate_{i}" for i in host for _ in range(3)]
    if native.AVAILABLE:
        # setup.py reads the CPU's flags; module.cpp asks the CPU: the same best set,
        # wherever the built extension has it
        available = native._native.available()
        if host[0] in available:
            assert available[0] == host[0], (available, host)


@pytest.mark.parametrize("value", ["avx2,bogus", "neon", ","])
def test_an_unknown_instruction_set_is_refused_by_name(monkeypatch, value):
    with pytest.raises(SystemExit, match="CONVTRANSPOSE_ISAS"):
        load_setup(monkeypatch, value)


def test_require_native_makes_the_extension_mandatory(monkeypatch):
    monkeypatch.setenv("CONVTRANSPOSE_REQUIRE_NATIVE", "1")
    _, ext = load_setup(monkeypatch, "all")
    assert not ext.optional


def elf_sections(path: Path) -> list[str]:
    """Section names of a 64-bit little-endian ELF file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a 64-bit LE ELF"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    return [data[names_at + h[0]:data.index(b"\0", names_at + h[0])].decode() for h in headers]


@pytest.mark.skipif(not native.AVAILABLE or platform.system() != "Linux"
                    or not (X86 or platform.machine() == "aarch64"),
                    reason="the compiled kernel, as an ELF file (Linux)")
def test_the_extension_ships_without_debug_info():
    so = Path(native._native.__file__)
    sections = elf_sections(so)
    assert ".text" in sections
    assert not [s for s in sections if s.startswith(".debug")], (
        f"{so.name} carries debug info ({so.stat().st_size / 1e6:.1f} MB): rebuild it "
        f"(python setup.py build_ext --inplace)")
