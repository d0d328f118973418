"""The ``stages`` parameter of the pixel-space cascades (DiffuseHigh, FreeScale): the long sides, in pixels, of the
canvases after the base one, the last the target's.

Validated in two steps, as every parameter is: the values themselves when the parameters are made
(:func:`checked_stages`), then against the request's size and the model's native size and latent grid
(:func:`check_stages`); :func:`cascade_canvases` turns them into the canvases the plan prints and the run samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from hiresdiff.config import GenerationSettings, check_finite
from hiresdiff.errors import require
from hiresdiff.stages import canvas_at


def checked_stages(stages: Sequence[float] | None) -> tuple[float, ...] | None:
    """``stages`` as a tuple of whole, positive, ascending long sides; one line for anything else."""
    if stages is None:
        return None
    sides = tuple(stages)
    require(len(sides) > 0, "stages needs at least one long side in pixels, e.g. 2048")
    for side in sides:
        check_finite("stages", side)
        require(float(side).is_integer() and side > 0, f"stages are long sides in whole pixels, got {side}")
    require(
        all(a < b for a, b in itertools.pairwise(sides)),
        f"stages must ascend, got {','.join(f'{s:g}' for s in sides)}",
    )
    return sides


def check_stages(stages: Sequence[float] | None, settings: GenerationSettings, native: int, grid: int) -> None:
    """One line when ``stages`` do not end at the target's long side, start at or below the base canvas (long side
    ``native``) or leave the latent ``grid``."""
    if stages is None:
        return
    long = max(settings.height, settings.width)
    last, first = int(stages[-1]), int(stages[0])
    require(last == long, f"the last of stages must be the target's long side {long} px, got {last}")
    require(first > native, f"stages start above the base canvas ({native} px long side), got {first}")
    for side in stages:
        require(int(side) % grid == 0, f"stage {int(side)} px is not a multiple of the latent grid ({grid} px)")


def cascade_canvases(
    phases: list[tuple[int, int]], stages: Sequence[float] | None, height: int, width: int, grid: int
) -> list[tuple[int, int]]:
    """The canvases in sampling order: the method's default ``phases`` (base first, target last), or, with
    ``stages``, the base then one canvas per stage at the target's aspect, the last exactly the target; only the
    base when the target is no larger."""
    if stages is None or len(phases) == 1:
        return phases
    return [phases[0], *(canvas_at(height, width, int(side), grid) for side in stages[:-1]), (height, width)]
