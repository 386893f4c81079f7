"""Work that may crash the process, run in a worker process that is started again after
it dies: the sweep times peers on random layers, and a peer's native code can fail hard on
one (PyTorch 2.13's channels-last backward of a 165 -> 128 k7 s2 layer on 3x2x3 pixels
corrupts its heap: "free(): invalid size", or a segmentation fault a few calls later). In
one process that ended the whole sweep; here it ends one worker, and the caller learns
which task it was on.

The worker runs `setup(*setup_args)` once, then for each task `work(state, task, log)`,
where `log(line)` reaches the caller's log at once. Both must be importable module-level
functions (the worker is spawned, not forked: a fork of a process whose thread pools are
running is unsafe).
"""

import multiprocessing
import signal
from collections.abc import Callable
from typing import Any


class WorkerDied(RuntimeError):
    """The worker process ended while it ran a task: `exitcode` is its exit status (minus
    the signal's number when a signal ended it)."""

    def __init__(self, exitcode: int | None) -> None:
        self.exitcode = exitcode
        super().__init__(f"the worker process died ({describe_exit(exitcode)})")


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "no exit status"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit status {exitcode}"


def _serve(conn: Any, setup: Callable[..., Any], setup_args: tuple,
           work: Callable[[Any, Any, Callable[[str], None]], Any]) -> None:
    state = setup(*setup_args)
    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(("done", work(state, task, lambda line: conn.send(("log", line)))))


class Worker:
    """One worker process at a time, started on the first task and again after a death;
    use as a context manager (the worker is stopped on exit)."""

    def __init__(self, setup: Callable[..., Any], setup_args: tuple,
                 work: Callable[[Any, Any, Callable[[str], None]], Any],
                 log: Callable[[str], None]) -> None:
        self._setup, self._setup_args, self._work, self._log = setup, setup_args, work, log
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: Any = None

    def run(self, task: Any) -> Any:
        """`work`'s result for `task`; raises WorkerDied if the worker ended meanwhile (the
        next task starts a new one). An exception `work` raises ends the worker too."""
        if self._process is None:
            parent, child = self._context.Pipe()
            self._process = self._context.Process(
                target=_serve, args=(child, self._setup, self._setup_args, self._work),
                daemon=True)
            self._process.start()
            child.close()
            self._conn = parent
        try:
            self._conn.send(task)
            while True:
                kind, value = self._conn.recv()
                if kind == "done":
                    return value
                self._log(value)
        except (EOFError, ConnectionError, OSError):
            process, self._process = self._process, None
            self._conn.close()
            process.join(10)
            raise WorkerDied(process.exitcode) from None

    def close(self) -> None:
        if self._process is not None:
            try:
                self._conn.send(None)
            except (ConnectionError, OSError):
                pass
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()
            self._conn.close()
            self._process = None

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
