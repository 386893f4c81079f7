"""What the gradient's NumPy and compiled paths share: tiles of input rows, and partial
sums added in a fixed order (so that the bits do not depend on which worker ends first)."""

import numpy as np

from ._plan import Tile, split_tiles
from ._spec import ConvSpec


def input_tiles(spec: ConvSpec, max_rows: int, min_tiles: int) -> list[Tile]:
    """The input grid cut by `split_tiles` into tiles whole along W, of at most
    `max_rows` positions (never less than one row), `min_tiles` where it allows."""
    return split_tiles(spec.batch, spec.in_spatial, max(spec.in_spatial[2], max_rows),
                       min_tiles)


def sum_in_order(parts: list[np.ndarray]) -> np.ndarray:
    """The parts added into the first, in list order: reproducible sums."""
    total = parts[0]
    for part in parts[1:]:
        total += part  # a fixed order: reproducible sums
    return total
