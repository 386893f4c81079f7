"""What a newcomer meets first: a plan shown in a notebook, type hints in help(), the
py.typed marker, `convtranspose --version`, and an import that prints nothing."""

from __future__ import annotations

import importlib.resources
import inspect
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import convtranspose as ct

ROOT = Path(__file__).resolve().parent.parent


def test_plan_repr_is_the_readable_summary():
    p = ct.plan((1, 8, 8, 8, 16), (8, 3, 3, 3, 16), stride=2, padding=1)
    shown = repr(p)  # what a notebook cell displays
    assert shown == str(p)
    assert not shown.startswith("Plan(spec=")
    assert f"algorithm  {p.algorithm}" in shown
    assert "workspace" in shown and "(1, 15, 15, 15, 8)" in shown


def _public_functions():
    for name in ct.__all__:
        obj = getattr(ct, name)
        if inspect.isfunction(obj) or inspect.isbuiltin(obj):
            yield name, obj


def test_type_hints_are_objects_not_strings():
    checked = 0
    for name, fn in _public_functions():
        sig = inspect.signature(fn)
        hints = [p.annotation for p in sig.parameters.values()] + [sig.return_annotation]
        for hint in hints:
            assert not isinstance(hint, str), (name, hint)
        checked += 1
    assert checked >= 15


def _help_signature(fn) -> str:
    """The signature line that help() prints under its header."""
    text = pydoc.render_doc(fn, renderer=pydoc.plaintext)
    return next(line for line in text.splitlines() if line.startswith(fn.__name__ + "("))


def test_help_shows_readable_hints():
    line = _help_signature(ct.conv_transpose3d)
    assert "stride: int | tuple[int, ...] = 1" in line and "-> numpy.ndarray" in line
    assert "'" not in line and "IntOrTuple" not in line
    assert _help_signature(ct.set_num_threads) == "set_num_threads(n: int | None) -> None"


def test_py_typed_ships_as_package_data():
    # In CI the package is the installed wheel: the marker must be in it.
    assert importlib.resources.files("convtranspose").joinpath("py.typed").is_file()
    # ... and the build must be told to ship it (pyproject.toml's package-data).
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^convtranspose = \[[^\]]*"py\.typed"', section, re.M), section


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_version_names_the_version_and_the_kernel():
    res = _run("-m", "convtranspose", "--version")
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    assert line.startswith(f"convtranspose {ct.__version__} (")
    isa = ct.native_isa()
    assert (f"compiled kernel: {isa}" if isa else "no compiled kernel") in line


def test_import_prints_and_warns_nothing():
    res = _run("-W", "error", "-c", "import convtranspose")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""

