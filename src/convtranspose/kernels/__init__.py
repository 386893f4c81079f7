"""The forward algorithms, one module each, and the registry the planner chooses from.

Each module builds one `Kernel`: whether it fits a layer (and why not), its cost model,
how it groups the phases and sizes its tiles' buffers, and how it runs a plan. The planner
(`_plan.choose_algorithm`) takes the fastest estimate among the kernels that fit; a plan
asked for by name is refused with the kernel's own reason; `_execute.execute` runs
`REGISTRY[plan.algorithm].run`. A new algorithm is one module and one member of
`_algorithms.Algorithm` (or one `register` call, as a test does).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._algorithms import Algorithm
from .._plan import SMALL_TILE_BYTES

if TYPE_CHECKING:
    import numpy as np

    from .._geometry import Phase
    from .._plan import Plan, Tile
    from .._spec import ConvSpec

PhaseGroups = tuple[tuple["Phase", ...], ...]


def _no_buffer(spec: ConvSpec, phase_group: tuple[Phase, ...], tile: Tile,
               whole_input: bool) -> int:
    return 0


def _always(spec: ConvSpec) -> bool:
    return True


@dataclass(frozen=True)
class Kernel:
    """One forward algorithm, as the planner and the executor see it.

    name: what `plan(algorithm=...)` and `Plan.algorithm` call it.
    fits(spec, limit): None where it can run the layer within `limit` bytes of workspace,
        else the reason it cannot (the refusal message of a plan that asks for it).
    estimate(spec): seconds on one core, the planner's model (ratios matter, not
        absolutes).
    phase_groups(spec): the phases that carry taps, grouped as its tasks compute them.
    buffer_elems(spec, phase_group, tile, whole_input): scratch elements one task needs.
    run(plan, x3, w3, out, bias): computes the plan's output into `out` (zeroed, or
        holding the bias, unless `writes_every_output`).
    writes_every_output(spec): whether `run` stores every output element (no zeroing).
    compiled: the compiled kernel's family (its tiles are planned by `_plan`'s native
        rules, and the pool's threads are woken before it runs).
    exact: results bit for bit the direct sum; an inexact one (winograd) is offered only
        while `set_winograd` allows.
    fallback: offered by the planner only without the compiled kernel (still runs when
        asked for by name).
    serial: its tasks run on one worker (the plan's threads are 1).
    tile_bytes: the scratch a task aims at (elementwise passes want their tile in L2).
    make_plan: its own plan builder (spec, limit, est, threads) -> Plan, instead of tiles.
    input_copy_bytes(spec): where set, its run first copies the whole input, converted,
        into a layout every task reads (so no task converts rows); the copy's size, which
        the plan counts in its workspace.
    """

    name: str
    fits: Callable[[ConvSpec, int], str | None]
    estimate: Callable[[ConvSpec], float]
    phase_groups: Callable[[ConvSpec], PhaseGroups]
    run: Callable[[Plan, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None], None]
    buffer_elems: Callable[[ConvSpec, tuple[Phase, ...], Tile, bool], int] = _no_buffer
    writes_every_output: Callable[[ConvSpec], bool] = lambda spec: False
    compiled: bool = False
    exact: bool = True
    fallback: bool = False
    serial: bool = False
    tile_bytes: int = SMALL_TILE_BYTES
    make_plan: Callable[[ConvSpec, int, dict, int], Plan] | None = None
    input_copy_bytes: Callable[[ConvSpec], int] | None = None


# The built-in kernels, in the order the planner lists them (ties go to the first).
_BUILTIN = tuple(Algorithm)

REGISTRY: dict[str, Kernel] = {}


def register(kernel: Kernel) -> Kernel:
    """Add (or replace) a kernel. Plans made before are forgotten, since the planner's
    choices may change."""
    REGISTRY[kernel.name] = kernel
    _forget_plans()
    return kernel


def unregister(name: str) -> None:
    del REGISTRY[name]
    _forget_plans()


def _forget_plans() -> None:
    """The planner's cache and the front door's recent calls."""
    from .. import _api, _plan

    _plan._make_plan.cache_clear()
    _api._recent_plans = _api.RecentCalls()


for _name in _BUILTIN:
    REGISTRY[_name] = importlib.import_module(f".{_name}", __name__).KERNEL
