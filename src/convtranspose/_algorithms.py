"""The algorithms' names, as enums: one list says which exist, and a misspelt name fails
where it is written. Members are strings (equal to their names, hashed, printed and
formatted as them), so the public API still takes plain strings, and `plan.algorithm ==
"shift"` and ``print(plan)`` read as before."""

import enum


class _Name(str, enum.Enum):
    """A str enum whose members print as their names (the standard library's StrEnum,
    which Python 3.10 lacks)."""

    def __str__(self) -> str:
        return str.__str__(self)


class Algorithm(_Name):
    """The forward's built-in kernels, in the planner's order: each is the module
    `kernels/<name>.py` (the registry takes other names too: a test's kernel)."""

    SHIFT = "shift"
    SCATTER = "scatter"
    DIRECT = "direct"
    INDEXED = "indexed"
    NATIVE = "native"
    WINOGRAD = "winograd"
    FAN_IN = "fan_in"
    PLANAR = "planar"
    COLS = "cols"


class VjpAlgorithm(_Name):
    """The backward's paths (`GradStep.algorithm`): the compiled kernel's (`_vjp_native`),
    the NumPy/BLAS ones (`_vjp_numpy`), or none."""

    NATIVE = "native"  # the compiled kernel (grad_weight's layout chosen by the plan)
    WINOGRAD = "winograd"  # grad_input only: F(2,3) along D, on the compiled kernel
    GATHER = "gather"
    SHIFT = "shift"
    DIRECT = "direct"
    INDEXED = "indexed"
    ZEROS = "zeros"  # no tap reaches the output: nothing to sum
