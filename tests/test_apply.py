"""`convtranspose apply`, run as a user runs it: in subprocesses.

Results equal the in-memory call (.npy -> .zarr, .npy -> .npy, Zarr -> .npy); a volume whose
input and output both exceed a memory cap streams within it (peak RSS of the subprocess);
an interrupted run leaves nothing that looks complete and running again finishes it; bad
input gets exit code 2, one line on stderr and no file; the progress bar shows on a terminal
only, a summary line otherwise."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

import convtranspose as ct
from convtranspose._apply import eta_text

CLI = [sys.executable, "-m", "convtranspose", "apply"]
FUNCS = {1: ct.conv_transpose1d, 2: ct.conv_transpose2d, 3: ct.conv_transpose3d}


def run_cli(*args, cwd, timeout: float = 120) -> subprocess.CompletedProcess:
    """Not a terminal: stdin closed, stdout and stderr piped."""
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def read_output(path) -> np.ndarray:
    path = str(path)
    return zarr.open_array(path, mode="r")[...] if path.endswith(".zarr") else np.load(path)


def leftovers(folder) -> list[str]:
    """Hidden work files (temporary result, progress log) left in a folder."""
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def save(folder, name: str, array: np.ndarray) -> str:
    path = os.path.join(folder, name)
    np.save(path, array)
    return name


def as_flag(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


CASES = [
    # (name, input shape, weight shape, settings, chunk)
    ("3d-mixed-groups-bias", (2, 9, 10, 7, 4), (6, 3, 2, 3, 2),
     dict(stride=(2, 1, 3), padding=(1, -1, 0), dilation=(1, 2, 1), output_padding=(0, 3, 1),
          groups=2), "5,4,7"),
    ("3d-gan-k4s2p1", (1, 6, 7, 8, 8), (4, 4, 4, 4, 8), dict(stride=2, padding=1), None),
    ("3d-big-output-padding", (1, 4, 5, 3, 3), (2, 2, 2, 2, 3),
     dict(stride=2, padding=(2, 0, 1), output_padding=(5, 1, 3)), "3"),
    ("2d-depthwise", (3, 11, 9, 4), (4, 3, 3, 1), dict(stride=2, padding=1, output_padding=1,
                                                      groups=4), "4,5"),
    ("1d-dilated", (2, 13, 3), (5, 3, 3), dict(stride=3, padding=2, dilation=2), "7"),
]


@pytest.mark.parametrize("out_name", ["out.zarr", "out.npy"])
@pytest.mark.parametrize("name, x_shape, w_shape, kw, chunk", CASES, ids=[c[0] for c in CASES])
def test_npy_input_matches_in_memory(tmp_path, rng, assert_close, out_name, name, x_shape,
                                     w_shape, kw, chunk):
    x = rng.uniform(-1, 1, x_shape).astype(np.float32)
    w = rng.uniform(-1, 1, w_shape).astype(np.float32)
    b = rng.uniform(-1, 1, w_shape[0]).astype(np.float32)
    args = [save(tmp_path, "x.npy", x), save(tmp_path, "w.npy", w), "-o", out_name,
            "--bias", save(tmp_path, "b.npy", b)]
    for key, value in kw.items():
        args += [f"--{key.replace('_', '-')}", as_flag(value)]
    if chunk:
        args += ["--chunk", chunk]
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    # Not a terminal: no bar, only the summary line.
    assert res.stdout == "" and res.stderr.startswith(f"wrote {out_name}: ")
    assert res.stderr.count("\n") == 1
    expected = FUNCS[len(x_shape) - 2](x, w, **kw) + b
    got = read_output(tmp_path / out_name)
    assert got.dtype == np.float32
    assert_close(got, expected, np.float32, what=name)
    assert leftovers(tmp_path) == []
    if out_name.endswith(".zarr") and chunk:
        sizes = [int(c) for c in chunk.split(",")]
        sizes = sizes + list(expected.shape[2:-1]) if len(sizes) == 1 else sizes
        expected_chunks = (1, *(min(c, o) for c, o in zip(sizes, expected.shape[1:-1])),
                           expected.shape[-1])
        assert zarr.open_array(str(tmp_path / out_name)).chunks == expected_chunks


def test_zarr_input_and_float64(tmp_path, rng, assert_close):
    x = rng.uniform(-1, 1, (2, 7, 6, 5, 3))
    w = rng.uniform(-1, 1, (2, 3, 3, 3, 3)).astype(np.float32)
    z = zarr.open_array(str(tmp_path / "x.zarr"), mode="w", shape=x.shape,
                        chunks=(1, 3, 4, 5, 3), dtype=x.dtype)
    z[...] = x
    res = run_cli("x.zarr", save(tmp_path, "w.npy", w), "-o", "y.npy", "--stride", "1,2,2",
                  "--padding", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    got = np.load(tmp_path / "y.npy")
    assert got.dtype == np.float64  # MLX promotion: float64 input, float32 weight
    assert_close(got, ct.conv_transpose3d(x, w, (1, 2, 2), 1), np.float64)


def test_rerun_replaces_an_existing_output(tmp_path, rng, assert_close):
    x = rng.uniform(-1, 1, (1, 5, 5, 5, 2)).astype(np.float32)
    w = rng.uniform(-1, 1, (3, 2, 2, 2, 2)).astype(np.float32)
    save(tmp_path, "x.npy", x)
    save(tmp_path, "w.npy", w)
    for out in ("y.zarr", "y.npy"):
        assert run_cli("x.npy", "w.npy", "-o", out, cwd=tmp_path).returncode == 0
        res = run_cli("x.npy", "w.npy", "-o", out, "--stride", "2", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert_close(read_output(tmp_path / out), ct.conv_transpose3d(x, w, 2), np.float32)
    assert leftovers(tmp_path) == []


# ---- bounded memory ---------------------------------------------------------------------

CAP_MB = 300  # decimal megabytes, as in "a 453 MB output within 300 MB peak RSS"
PEAK_RSS = ("import resource, subprocess, sys\n"
            "r = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
            "sys.exit(r.returncode)")


@pytest.fixture(scope="module")
def big_volume(tmp_path_factory):
    """Input 302 MB, output 503 MB: both exceed the cap. Written a slice at a time."""
    folder = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(7)
    shape = (1, 96, 128, 128, 48)
    x = np.lib.format.open_memmap(folder / "x.npy", mode="w+", dtype=np.float32, shape=shape)
    for d in range(shape[1]):
        x[0, d] = rng.random(shape[2:], dtype=np.float32)
    x.flush()
    del x
    w = (rng.standard_normal((10, 2, 2, 2, 48)) * 0.1).astype(np.float32)
    np.save(folder / "w.npy", w)
    return folder


@pytest.mark.parametrize("out_name", ["big.npy", "big.zarr"])
def test_output_beyond_memory_cap_streams(big_volume, out_name):
    folder = big_volume
    res = subprocess.run([sys.executable, "-c", PEAK_RSS, *CLI, "x.npy", "w.npy", "-o",
                          out_name, "--stride", "2"], cwd=folder, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    peak_mb = int(res.stdout.split()[-1]) * 1024 / 1e6  # ru_maxrss is in KiB on Linux
    in_mb = os.path.getsize(folder / "x.npy") / 1e6
    out_shape = (1, 192, 256, 256, 10)
    out_mb = np.prod(out_shape) * 4 / 1e6
    assert in_mb > CAP_MB and out_mb > CAP_MB
    assert peak_mb < CAP_MB, f"peak RSS {peak_mb:.0f} MB for a {out_mb:.0f} MB output"
    # Spot-check the streamed result against the in-memory call on a corner and a far edge.
    x = np.load(folder / "x.npy", mmap_mode="r")
    w = np.load(folder / "w.npy")
    if out_name.endswith(".zarr"):
        y = zarr.open_array(str(folder / out_name), mode="r")
    else:
        y = np.load(folder / out_name, mmap_mode="r")
    assert y.shape == out_shape
    np.testing.assert_allclose(y[:, :8, :8, :8], ct.conv_transpose3d(x[:, :4, :4, :4], w, 2),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[:, -6:, -6:, -6:],
                               ct.conv_transpose3d(x[:, -3:, -3:, -3:], w, 2),
                               rtol=1e-5, atol=1e-5)
    assert leftovers(folder) == []
    del x, y
    _remove_output(folder / out_name)  # half a gigabyte: don't keep it in /tmp


# ---- interruption and restart -----------------------------------------------------------

def _interrupted_run(folder, args, sig) -> tuple[subprocess.Popen, int]:
    """Start a run, stop it right after its first block is logged, then send `sig`."""
    progress = folder / f".{args[args.index('-o') + 1]}.progress"
    proc = subprocess.Popen([*CLI, *args], cwd=folder, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if progress.read_text().count("\n") >= 2:  # the header and one block
                break
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGSTOP)  # freeze it mid-way, whatever the machine's load
    logged = progress.read_text().count("\n") - 1
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    proc.wait(timeout=60)
    return proc, logged


@pytest.fixture(scope="module")
def mid_volume(tmp_path_factory):
    """An output of 131 MB (stride 2): four 32 MiB blocks (.npy) or eight of 16 MiB (.zarr)."""
    folder = tmp_path_factory.mktemp("mid")
    rng = np.random.default_rng(3)
    np.save(folder / "x.npy", rng.random((1, 40, 80, 80, 16), dtype=np.float32))
    np.save(folder / "w.npy", (rng.standard_normal((16, 3, 3, 3, 16)) * 0.1).astype(np.float32))
    return folder


@pytest.mark.parametrize("out_name, sig", [("y.npy", signal.SIGINT),
                                           ("y.zarr", signal.SIGKILL)])
def test_interrupted_run_leaves_nothing_complete_and_resumes(mid_volume, out_name, sig):
    folder = mid_volume
    args = ["x.npy", "w.npy", "-o", out_name, "--stride", "2", "--padding", "1",
            "--output-padding", "1"]
    proc, logged = _interrupted_run(folder, args, sig)
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        err = proc.stderr.read()
        assert "interrupted" in err and "Traceback" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert logged >= 1
    assert not os.path.exists(folder / out_name)  # nothing that looks complete
    assert sorted(n for n in os.listdir(folder) if not n.startswith(".")) == ["w.npy", "x.npy"]

    res = run_cli(*args, cwd=folder, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr
    x, w = np.load(folder / "x.npy"), np.load(folder / "w.npy")
    assert_nearly_equal(read_output(folder / out_name), ct.conv_transpose3d(x, w, 2, 1, 1, 1))
    assert leftovers(folder) == []
    _remove_output(folder / out_name)


def test_a_different_command_restarts_instead_of_resuming(mid_volume):
    folder = mid_volume
    args = ["x.npy", "w.npy", "-o", "z.npy", "--stride", "2"]
    _interrupted_run(folder, args, signal.SIGINT)
    res = run_cli("x.npy", "w.npy", "-o", "z.npy", "--stride", "1", "--quiet", cwd=folder)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    x, w = np.load(folder / "x.npy"), np.load(folder / "w.npy")
    assert_nearly_equal(np.load(folder / "z.npy"), ct.conv_transpose3d(x, w, 1))
    assert leftovers(folder) == []
    _remove_output(folder / "z.npy")


def assert_nearly_equal(got: np.ndarray, expected: np.ndarray) -> None:
    """Float32 rounding apart, equal (cheap enough for a 100 MB array)."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert float(np.max(np.abs(got - expected))) <= 1e-5 * float(np.max(np.abs(expected)))


def _remove_output(path) -> None:
    import shutil
    shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


# ---- bad input --------------------------------------------------------------------------

BAD = [
    ("missing input", ["nope.npy", "w.npy", "-o", "y.zarr"], "does not exist"),
    ("missing weight", ["x.npy", "nope.npy", "-o", "y.zarr"], "does not exist"),
    ("integer input", ["xi.npy", "w.npy", "-o", "y.zarr"], "floating dtype"),
    ("not an npy", ["junk.npy", "w.npy", "-o", "y.zarr"], "not a readable .npy"),
    ("folder that is no zarr", ["sub", "w.npy", "-o", "y.zarr"], "neither"),
    ("input rank", ["x6.npy", "w.npy", "-o", "y.zarr"], "3, 4 or 5 dimensions"),
    ("channel mismatch", ["x.npy", "wbad.npy", "-o", "y.zarr"], "channel mismatch"),
    ("weight rank", ["x.npy", "w2d.npy", "-o", "y.zarr"], "5 dimensions"),
    ("stride text", ["x.npy", "w.npy", "-o", "y.zarr", "--stride", "two"], "--stride"),
    ("stride zero", ["x.npy", "w.npy", "-o", "y.zarr", "--stride", "0"], "--stride must be"),
    ("stride count", ["x.npy", "w.npy", "-o", "y.zarr", "--stride", "1,2"],
     "--stride takes one int for every axis or 3 comma-separated ints, one per spatial axis "
     "(D,H,W) of the 3-D INPUT: e.g. --stride 2 or --stride 1,2,2; got 1,2"),
    ("padding count", ["x.npy", "w.npy", "-o", "y.zarr", "--padding", "1,1,1,1"],
     "--padding 2 or --padding 1,2,2"),
    ("output padding count", ["x2d.npy", "w2d.npy", "-o", "y.zarr", "--output-padding", "1,1,1"],
     "--output-padding takes one int for every axis or 2 comma-separated ints, one per spatial "
     "axis (H,W)"),
    ("swapped", ["w16.npy", "x16.npy", "-o", "y.npy"],
     "INPUT and WEIGHT look swapped: INPUT w16.npy (2, 3, 3, 3, 4) reads as a weight "
     "(C_out, D,H,W kernel 3x3x3, C_in/groups) and WEIGHT x16.npy (1, 16, 16, 16, 4) as a "
     "volume (N, D,H,W 16x16x16, C_in); give the volume first: convtranspose apply x16.npy "
     "w16.npy -o y.npy"),
    ("swapped, and groups fit only the right order",
     ["w16g.npy", "x16.npy", "-o", "y.npy", "--groups", "2", "--stride", "2"], "look swapped"),
    ("groups", ["x.npy", "w.npy", "-o", "y.zarr", "--groups", "3"], "groups"),
    ("output too small", ["x.npy", "w.npy", "-o", "y.zarr", "--padding", "9"],
     "reduce --padding or increase --output-padding"),
    ("bias shape", ["x.npy", "w.npy", "-o", "y.zarr", "--bias", "w.npy"], "--bias"),
    ("bias dtype", ["x.npy", "w.npy", "-o", "y.zarr", "--bias", "bi.npy"], "--bias"),
    ("output suffix", ["x.npy", "w.npy", "-o", "y.h5"], ".zarr or .npy"),
    ("output folder", ["x.npy", "w.npy", "-o", "no/such/y.npy"], "does not exist"),
    ("chunk", ["x.npy", "w.npy", "-o", "y.npy", "--chunk", "0"], "--chunk"),
    ("chunk count", ["x.npy", "w.npy", "-o", "y.npy", "--chunk", "1,2"], "--chunk"),
    ("output is a folder", ["x.npy", "w.npy", "-o", "keep.zarr"], "not a Zarr store"),
    ("no output given", ["x.npy", "w.npy"], "-o/--output"),
]


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    np.save(folder / "x.npy", np.ones((1, 4, 4, 4, 4), np.float32))
    np.save(folder / "xi.npy", np.ones((1, 4, 4, 4, 4), np.int16))
    np.save(folder / "x6.npy", np.ones((1, 2, 2, 2, 2, 4), np.float32))
    np.save(folder / "w.npy", np.ones((2, 3, 3, 3, 4), np.float32))
    np.save(folder / "wbad.npy", np.ones((2, 3, 3, 3, 3), np.float32))
    np.save(folder / "w2d.npy", np.ones((2, 3, 3, 4), np.float32))
    np.save(folder / "x2d.npy", np.ones((1, 5, 5, 4), np.float32))
    np.save(folder / "x16.npy", np.ones((1, 16, 16, 16, 4), np.float32))
    np.save(folder / "w16.npy", np.ones((2, 3, 3, 3, 4), np.float32))
    np.save(folder / "w16g.npy", np.ones((2, 3, 3, 3, 2), np.float32))
    np.save(folder / "bi.npy", np.ones(2, np.int64))
    (folder / "junk.npy").write_text("not numpy\n")
    (folder / "sub").mkdir()
    (folder / "keep.zarr").mkdir()
    (folder / "keep.zarr" / "notes.txt").write_text("a user's file\n")
    return folder


@pytest.mark.parametrize("what, args, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(bad_folder, what, args, message):
    before = sorted(os.listdir(bad_folder))
    res = run_cli(*args, cwd=bad_folder)
    assert res.returncode == 2, (what, res.returncode, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("convtranspose apply: error: ")
    assert message in lines[0]
    # Said in the command's terms: flags and INPUT/WEIGHT, not Python's names and tuples.
    assert "tuple" not in lines[0]
    assert not re.search(r"'(stride|padding|dilation|output_padding|groups|input|weight)'",
                         lines[0]), lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert sorted(os.listdir(bad_folder)) == before
    assert os.listdir(bad_folder / "sub") == []
    assert os.listdir(bad_folder / "keep.zarr") == ["notes.txt"]


def test_help_lists_the_options(tmp_path):
    res = run_cli("--help", cwd=tmp_path)
    assert res.returncode == 0
    for flag in ("--stride", "--padding", "--dilation", "--output-padding", "--groups",
                 "--bias", "--chunk", "--quiet", "-o OUTPUT"):
        assert flag in res.stdout


# ---- progress ---------------------------------------------------------------------------

def _run_on_terminal(args, cwd) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal; return the exit code and what it drew."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*CLI, *args], cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the terminal closes when the child exits
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode()


def test_progress_bar_on_a_terminal_only(tmp_path, rng):
    np.save(tmp_path / "x.npy", rng.random((1, 24, 64, 64, 8), dtype=np.float32))
    np.save(tmp_path / "w.npy", rng.random((8, 2, 2, 2, 8), dtype=np.float32))
    code, drawn = _run_on_terminal(["x.npy", "w.npy", "-o", "y.npy", "--stride", "2"],
                                   tmp_path)
    assert code == 0
    assert "\r[" in drawn and "100%" in drawn and "MB/s" in drawn
    assert "wrote y.npy" in drawn
    mid_run = [frame for frame in drawn.split("\r") if "%" in frame and "100%" not in frame]
    assert mid_run and not [frame for frame in mid_run if "ETA 0:00" in frame], mid_run

    code, drawn = _run_on_terminal(["x.npy", "w.npy", "-o", "y.npy", "--quiet"], tmp_path)
    assert code == 0 and drawn == ""

    # A pipe, not a terminal: no bar, one summary line on stderr, nothing on stdout.
    res = run_cli("x.npy", "w.npy", "-o", "y.npy", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout == ""
    assert re.fullmatch(r"wrote y\.npy: \(1, 25, 65, 65, 8\) float32, 3\.4 MB in [\d.]+ s "
                        r"\([\d.]+ [kM]B/s\)\n", res.stderr), res.stderr
    res = run_cli("x.npy", "w.npy", "-o", "y.npy", "--quiet", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == ""


def test_a_kernel_larger_than_its_input_is_not_taken_for_swapped_files(tmp_path, rng):
    # A 1x1x1 latent into a 4x4x4 kernel (a GAN's first layer): legitimate, not swapped.
    x = rng.standard_normal((3, 1, 1, 1, 8), dtype=np.float32)
    w = rng.standard_normal((5, 4, 4, 4, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "w.npy", w)
    res = run_cli("x.npy", "w.npy", "-o", "y.npy", "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ct.conv_transpose3d(x, w),
                               rtol=1e-5, atol=1e-5)


def test_eta_is_rounded_up():
    assert [eta_text(s) for s in (0.0, 0.4, 59.2, 61.0, 3600.0, float("inf"))] == \
        ["0:00", "0:01", "1:00", "1:01", "60:00", "-:--"]
