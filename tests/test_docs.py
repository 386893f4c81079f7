"""The guides are part of the product: every ```python block of README.md and docs/*.md
runs as written, in order, one namespace per file; the figure script runs; links resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

import convtranspose as ct

ROOT = Path(__file__).resolve().parent.parent
GUIDES = ["README.md", "docs/PYTORCH_DISSONANCE.md", "docs/NUMPY_USERS.md",
          "docs/COMMON_PITFALLS.md"]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, source) of each ```python block, in file order."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def test_block_extraction_sees_every_fence() -> None:
    text = "intro\n```python\na = 1\n```\ntext\n```bash\nls\n```\n```python\nb = a + 1\n```\n"
    blocks = python_blocks(text)
    assert [src for _, src in blocks] == ["a = 1\n", "b = a + 1\n"]
    assert [line for line, _ in blocks] == [3, 10]


def run_blocks(label: str, text: str) -> int:
    """Execute the python blocks of one file in order, in one namespace; fail naming the
    file, the block number and its first line. Returns how many blocks ran."""
    namespace: dict = {"__name__": f"guide_{Path(label).stem}"}
    blocks = python_blocks(text)
    try:
        for number, (line, source) in enumerate(blocks, start=1):
            # Leading newlines make tracebacks quote the line numbers of the file itself.
            code = compile("\n" * (line - 1) + source, label, "exec")
            try:
                exec(code, namespace)
            except Exception:
                pytest.fail(f"{label}: python block {number} (starting at line {line}) "
                            f"failed:\n{traceback.format_exc(limit=-3)}", pytrace=False)
    finally:
        ct.set_num_threads(None)  # a guide may change the thread count: restore it
    return len(blocks)


def test_a_failing_block_is_reported_with_file_and_number() -> None:
    text = "```python\nx = 1\n```\nprose\n```python\nassert x == 2, 'claim'\n```\n"
    with pytest.raises(pytest.fail.Exception, match=r"demo\.md: python block 2 \(starting "
                                                    r"at line 6\)(.|\n)*claim"):
        run_blocks("demo.md", text)
    assert run_blocks("ok.md", "```python\nx = 1\n```\n```python\nassert x == 1\n```\n") == 2


@pytest.mark.parametrize("name", GUIDES)
def test_guide_examples_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / name).read_text(encoding="utf-8")
    minimum = 1 if name == "README.md" else 3
    count = len(python_blocks(text))
    assert count >= minimum, f"{name}: {count} python examples, need >= {minimum}"
    # Examples may write files: keep them out of the repository.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    assert run_blocks(name, text) == count


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("name", GUIDES)
def test_relative_links_resolve(name: str) -> None:
    path = ROOT / name
    missing = [target for target in LINK.findall(path.read_text(encoding="utf-8"))
               if "://" not in target and not (path.parent / target).exists()]
    assert not missing, f"{name} links to missing files: {missing}"


def test_readme_carries_the_commands_and_the_measured_bench_table() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install . && convtranspose demo" in text
    assert 'pip install ".[test]" && python -m pytest -q' in text
    section = text.split("## Performance", 1)
    assert len(section) == 2, "README.md needs a '## Performance' section"
    # The table is the one `convtranspose bench --out docs/bench` wrote, row for row, and
    # the chart beside it exists: no number in the README that the repo did not measure.
    # The same for the gradients' table (`convtranspose bench --grad --out docs/bench/grad`).
    for folder in ("docs/bench", "docs/bench/grad"):
        bench = (ROOT / folder / "bench.md").read_text(encoding="utf-8")
        lines = bench.splitlines()
        rows = [line for line in lines if line.startswith("| W")]
        assert len(rows) == 9, f"{folder}/bench.md should hold the nine workloads"
        # Its header with the separator row under it: without that, Markdown shows no table.
        at = next(i for i, line in enumerate(lines) if line.startswith("| workload"))
        assert "\n".join(lines[at:at + 2]) in section[1], f"README lacks {folder}'s header"
        for row in rows:
            assert row in section[1], f"README's performance section lacks the row {row!r}"
        assert (ROOT / folder / "bench.png").exists()
        assert f"{folder}/bench.png" in section[1]


def test_figure_script_runs(tmp_path: Path) -> None:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_figures.py"),
                             "--out", str(tmp_path)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    made = sorted(p.name for p in tmp_path.glob("*.png"))
    assert made == ["checkerboard.png", "checkerboard_profile.png"]
    for png in tmp_path.glob("*.png"):
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    # The numbers the pitfalls guide quotes come from this output.
    assert "uniform weights          k3s2    interior values: [1.0, 2.0, 4.0]" in result.stdout
    # The committed figures exist (the guide shows them).
    for name in made:
        assert (ROOT / "docs" / "figures" / name).is_file()
