"""A good citizen in a long-running process (issue 22), each check in a fresh interpreter.

- Memory kept between calls goes back once unused: after a burst of calls of varied sizes
  (every result dropped) and a few seconds idle, the process holds at most 128 MiB more
  than before, without `release_memory()`.
- Ctrl-C stops a long call promptly (forward, vjp, a Dask compute, `convtranspose
  apply`): KeyboardInterrupt within 0.5 s of the SIGINT, no result, every thread idle
  afterwards, no memory held on, and the next call gives the bits it gave before.
- An idle process uses no CPU time.

The long calls are sized from a short timed call on this machine (a sizing, not an
assertion on speed), so that they last seconds whatever the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

import convtranspose as ct

MiB = 1 << 20
HELD_LIMIT = 128 * MiB
LATENCY_LIMIT_S = 0.5  # issue 22's target, asserted as is
IDLE_CPU_LIMIT_S = 0.05


# Child interpreters import the package this test imported (wherever they run).
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [os.path.dirname(os.path.dirname(ct.__file__)), os.environ.get("PYTHONPATH", "")])}


def _run_script(script: str, *args: str, timeout: float = 300) -> dict:
    """Run `script` in a fresh interpreter; it prints one JSON line last."""
    res = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                         text=True, timeout=timeout, env=CHILD_ENV)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


COMMON = r"""
import json, os, signal, sys, threading, time
import numpy as np, psutil
import convtranspose as ct

proc = psutil.Process()


def cpu() -> float:
    t = proc.cpu_times()
    return t.user + t.system


def idle_cpu(seconds: float) -> float:
    start = cpu()
    time.sleep(seconds)
    return cpu() - start
"""


# ---- memory ------------------------------------------------------------------------------

BURST = COMMON + r"""
from convtranspose import _memory

rng = np.random.default_rng(0)
w = rng.standard_normal((32, 2, 2, 2, 8)).astype(np.float32)
ct.conv_transpose3d(np.ones((1, 4, 4, 4, 8), np.float32), w, stride=2)
time.sleep(0.2)
base = proc.memory_info().rss
kept = 0
for i in range(300):  # outputs of 0.1 to 44 MiB, 300 sizes drawn at random
    d = int(rng.integers(6, 36))
    y = ct.conv_transpose3d(np.full((1, d, d, d, 8), 0.5, np.float32), w, stride=2)
    del y
    kept = max(kept, _memory._dropped_bytes)
time.sleep(3.0)
held = proc.memory_info().rss - base
idle = idle_cpu(1.0)
print(json.dumps({"kept": kept, "held": held, "idle_cpu": idle,
                  "waits_without_deadline": _memory._decayer_waits,
                  "left": len(_memory._dropped) + len(_memory._free)}))
"""


def test_memory_kept_for_reuse_goes_back_when_idle_and_idle_costs_no_cpu():
    out = _run_script(BURST)
    assert out["kept"] > 16 * MiB, "the burst should have reused dropped results' memory"
    assert out["held"] <= HELD_LIMIT, (
        f"{out['held'] / MiB:.0f} MiB still held 3 s after the burst")
    assert out["left"] == 0
    assert out["waits_without_deadline"]  # the decay thread sleeps until a block is kept
    assert out["idle_cpu"] < IDLE_CPU_LIMIT_S


def test_memory_is_reused_back_to_back_and_decays_after(monkeypatch):
    """In this process: a dropped result's block serves the next call of its size at once,
    and, unused, leaves the cache within a few DECAY_SECONDS."""
    from convtranspose import _memory
    monkeypatch.setattr(_memory, "DECAY_SECONDS", 0.2)
    _memory.release_memory()
    shape = (1, 8, 32, 32, 64)  # 2 MiB
    a = _memory.result_empty(shape, np.float32)
    address = a.ctypes.data
    del a
    b = _memory.result_empty(shape, np.float32)
    assert b.ctypes.data == address
    del b
    assert len(_memory._dropped) == 1
    deadline = time.monotonic() + 30  # generous: a loaded machine may starve the thread
    while _memory._dropped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _memory._dropped == [] and _memory._dropped_bytes == 0


# ---- Ctrl-C ------------------------------------------------------------------------------

INTERRUPT = COMMON + r"""
kind, side, channels = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
w = (rng.standard_normal((channels, 3, 3, 3, channels)) * 0.05).astype(np.float32)


def call(d):
    x = rng.standard_normal((1, d, d, d, channels), dtype=np.float32)
    if kind == "forward":
        return lambda: ct.conv_transpose3d(x, w, padding=1)
    if kind == "vjp":
        return lambda: ct.conv_transpose3d_vjp(x, w, x, padding=1)
    import dask.array as da
    from convtranspose import dask as ctd
    xd = da.from_array(x, chunks=(1, max(1, d // 2), d, d, channels))
    return lambda: ctd.conv_transpose3d(xd, w, padding=1).compute(scheduler="threads")


check = call(10)
before = check()
long_call = call(side)
base = proc.memory_info().rss
sent = []


def interrupt():
    sent.append(time.perf_counter())
    os.kill(os.getpid(), signal.SIGINT)


timer = threading.Timer(0.5, interrupt)
started = time.perf_counter()
timer.start()
try:
    result = long_call()
    out = {"returned_after": time.perf_counter() - started}
except KeyboardInterrupt:
    out = {"latency": time.perf_counter() - sent[0]}
    time.sleep(0.05)
    out["cpu_after"] = idle_cpu(0.3)
after = check()
if kind == "vjp":
    out["same"] = all(np.array_equal(a, b) for a, b in zip(before, after))
else:
    out["same"] = bool(np.array_equal(before, after))
del after
time.sleep(3.0)  # what the interrupted call took has decayed (DECAY_SECONDS 2)
out["held"] = proc.memory_info().rss - base
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def long_call():
    """(side, channels) of a (1, d, d, d, C) input whose 3x3x3, C -> C call takes about
    4 s here, from a timed 16^3, 64-channel call: the side grows first (at least 24, at most
    80), then the channels (at least 64, a multiple of 16), so that the input stays within
    ~0.5 GiB of float32 on a fast machine (80^3 x 64 channels ran in 0.3 s on an AVX-512
    Xeon, over before the SIGINT at 0.5 s)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 16, 16, 16, 64), dtype=np.float32)
    w = rng.standard_normal((64, 3, 3, 3, 64), dtype=np.float32)
    ct.conv_transpose3d(x, w, padding=1)
    start = time.perf_counter()
    ct.conv_transpose3d(x, w, padding=1)
    factor = 4.0 / max(time.perf_counter() - start, 1e-4)  # work: side^3 * channels^2
    side = int(min(80, max(24, 16 * factor ** (1 / 3))))
    channels = 64 * max(1.0, factor / (side / 16) ** 3) ** 0.5
    return side, int(min(256, channels // 16 * 16))


@pytest.mark.parametrize("kind", ["forward", "vjp", "dask"])
def test_ctrl_c_stops_a_long_call_promptly(kind, long_call):
    side, channels = long_call
    side = side if kind != "vjp" else max(24, int(side / 1.3))  # vjp: ~2x the work
    out = _run_script(INTERRUPT, kind, str(side), str(channels))
    assert "returned_after" not in out, (
        f"the call ended {out.get('returned_after', 0):.2f} s in, before the SIGINT at 0.5 s")
    assert out["latency"] < LATENCY_LIMIT_S, f"KeyboardInterrupt {out['latency']:.2f} s late"
    assert out["cpu_after"] < IDLE_CPU_LIMIT_S, (
        f"{out['cpu_after']:.2f} s of CPU in the 0.3 s after: threads still running")
    assert out["same"], "the call after the interrupt differs from the call before it"
    assert out["held"] <= HELD_LIMIT, f"{out['held'] / MiB:.0f} MiB more held afterwards"


HANDLER = COMMON + r"""
# A handler that does not raise: the call goes on and completes, with the same bits.
caught = []
signal.signal(signal.SIGINT, lambda *_: caught.append(1))
rng = np.random.default_rng(0)
side, channels = int(sys.argv[1]), int(sys.argv[2])
x = rng.standard_normal((1, side, side, side, channels), dtype=np.float32)
w = (rng.standard_normal((channels, 3, 3, 3, channels)) * 0.05).astype(np.float32)
want = ct.conv_transpose3d(x, w, padding=1)
threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
start = time.perf_counter()
got = ct.conv_transpose3d(x, w, padding=1)
print(json.dumps({"seconds": time.perf_counter() - start, "caught": len(caught),
                  "same": bool(np.array_equal(got, want))}))
"""


def test_a_handler_that_does_not_raise_lets_the_call_finish(long_call):
    side, channels = long_call
    out = _run_script(HANDLER, str(max(24, int(side * 0.7))), str(channels))
    assert out["seconds"] > 0.3, "the call ended before the signal: nothing was tested"
    assert out["caught"] == 1
    assert out["same"]


# ---- the CLI -----------------------------------------------------------------------------

def test_ctrl_c_stops_convtranspose_apply_promptly(tmp_path, long_call):
    """One block of seconds: SIGINT during it ends the run within the latency limit plus an
    interpreter's exit, with exit status 130 and no output that looks complete."""
    rng = np.random.default_rng(2)
    side, channels = long_call
    np.save(tmp_path / "x.npy", rng.standard_normal((1, side, side, side, channels),
                                                    dtype=np.float32))
    np.save(tmp_path / "w.npy", (rng.standard_normal((channels, 3, 3, 3, channels)) * 0.05)
            .astype(np.float32))
    chunk = str(side)  # the whole volume in one block
    proc = subprocess.Popen([sys.executable, "-m", "convtranspose", "apply", "x.npy", "w.npy",
                             "-o", "y.npy", "--padding", "1", "--chunk", chunk, "--quiet"],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    watched = psutil.Process(proc.pid)
    progress = tmp_path / ".y.npy.progress"
    deadline = time.monotonic() + 120
    while not progress.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    # The block is being computed once the process burns CPU after the log was started.
    start = sum(watched.cpu_times()[:2])
    while proc.poll() is None and sum(watched.cpu_times()[:2]) - start < 0.5:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    took = time.monotonic() - sent
    err = proc.stderr.read()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "y.npy").exists()
    # Python's exit and the writer thread's shutdown come on top of the interrupt itself.
    assert took < LATENCY_LIMIT_S + 1.5, f"the run ended {took:.2f} s after the SIGINT"

