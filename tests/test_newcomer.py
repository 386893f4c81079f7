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



# ------------------------------------------------------------------ docs/PERFORMANCE.md

def _tables(text: str) -> list[list[str]]:
    """Each Markdown table: its consecutive lines starting with '|'."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_performance_page_tables_are_well_formed_and_linked():
    text = (ROOT / "docs" / "PERFORMANCE.md").read_text(encoding="utf-8")
    tables = _tables(text)
    assert tables
    for table in tables:
        width = len(_cells(table[0]))
        assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", table[1].strip()), table[1]
        assert all(len(_cells(row)) == width for row in table), table[0]
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        assert "://" in target or (ROOT / "docs" / target).exists(), target
    assert "(docs/PERFORMANCE.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_performance_page_gives_the_workloads_as_the_bench_runs_them():
    from convtranspose._workloads import WORKLOADS

    text = (ROOT / "docs" / "PERFORMANCE.md").read_text(encoding="utf-8")
    table = next(t for t in _tables(text) if t[0].startswith("| workload | input"))
    header = _cells(table[0])
    rows = {r[0].split()[0]: dict(zip(header, r)) for r in map(_cells, table[2:])}
    assert list(rows) == list(WORKLOADS)

    def axes(v: tuple[int, ...]) -> str:
        return str(v[0]) if len(set(v)) == 1 else "x".join(map(str, v))

    for name, w in WORKLOADS.items():
        row = rows[name]
        assert row["workload"] == w.title
        assert row["input (N, D, H, W, C_in)"] == str(w.input_shape)
        assert row["weight (C_out, kD, kH, kW, C_in/groups)"] == str(w.weight_shape)
        assert row["stride"] == axes(w.stride) and row["padding"] == axes(w.padding)
        assert row["output_padding"] == axes(w.output_padding)
        assert row["groups"] == str(w.groups)
        assert w.dilation == (1, 1, 1)  # the table has no dilation column
        assert row["output (N, D, H, W, C_out)"] == str(
            ct.output_shape(w.input_shape, w.weight_shape, **w.settings))
        assert float(row["useful GFLOP"]) == float(f"{w.useful_flops / 1e9:.3g}")
