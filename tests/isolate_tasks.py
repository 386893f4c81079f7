"""Module-level functions for the isolation tests (test_sweep.py): a spawned worker
imports them by name, so they live in a module with no heavy imports."""

import os


def setup(prefix):
    return {"prefix": prefix, "pid": os.getpid()}


def work(state, task, log):
    if task == "abort":
        os.abort()  # as a peer's heap corruption ends the process: SIGABRT
    log(f"{state['prefix']}{task}")
    return (task, state["pid"])
