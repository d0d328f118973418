"""Stage plans: the canvas sizes a method samples at, in pixels (SPEC §0, §2.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hiresdiff.errors import require

#: the short side of the base canvas must keep at least this many latent cells
MIN_BASE_LATENT_SIDE = 4


@dataclass(frozen=True)
class Phase:
    """One canvas of a plan: ``height × width`` pixels at scale ``long side / native``."""

    height: int
    width: int
    native: int

    @property
    def scale(self) -> float:
        return max(self.height, self.width) / self.native

    @property
    def dilation(self) -> int:
        """Dilation factor ``d = ⌈scale⌉`` of DemoFusion's dilated sampling."""
        return max(1, -(-max(self.height, self.width) // self.native))


def round_to_grid(value: float, grid: int) -> int:
    """Nearest positive multiple of ``grid``."""
    return max(grid, round(value / grid) * grid)


def check_canvas(height: int, width: int, native: int, grid: int) -> None:
    """One-line errors for sizes off the latent grid, below native, or too elongated for the base canvas."""
    for name, value in (("height", height), ("width", width)):
        require(
            value % grid == 0,
            f"{name} {value} is not a multiple of the latent grid ({grid} px); try {round_to_grid(value, grid)}",
        )
    require(
        max(height, width) >= native,
        f"size {height}×{width} is below the model's native size {native} px (long side); hiresdiff generates at "
        f"or above it — use at least {native}",
    )
    short = min(height, width) * native / max(height, width)
    require(
        short >= MIN_BASE_LATENT_SIDE * grid,
        f"aspect ratio {max(height, width) / min(height, width):.1f}:1 is too extreme: the native-size base canvas "
        f"would be {short:.0f} px on its short side (minimum {MIN_BASE_LATENT_SIDE * grid})",
    )


def canvas_at(height: int, width: int, long_side: int, grid: int) -> tuple[int, int]:
    """The target's aspect at ``long_side`` pixels, the short side rounded to the grid."""
    if height >= width:
        return long_side, round_to_grid(width * long_side / height, grid)
    return round_to_grid(height * long_side / width, grid), long_side


def progressive_phases(height: int, width: int, native: int, grid: int) -> list[Phase]:
    """DemoFusion's phases: long side ``k·n`` for ``k = 1 … K−1``, then exactly the target; ``K = ⌈s⌉``."""
    long = max(height, width)
    count = max(1, math.ceil(long / native))
    phases = [Phase(*canvas_at(height, width, k * native, grid), native) for k in range(1, count)]
    return [*phases, Phase(height, width, native)]


def source_phase_index(phases: list[Phase], long_side: int) -> int:
    """The phase an input picture of ``long_side`` px stands for: the largest whose long side does not exceed it
    (at least the first). Later phases run as usual; the last phase (the target) is larger than the input."""
    fitting = [i for i, p in enumerate(phases) if max(p.height, p.width) <= long_side]
    return min(max(fitting, default=0), len(phases) - 2) if len(phases) > 1 else 0


def doubling_phases(height: int, width: int, native: int, grid: int) -> list[Phase]:
    """ScaleDiff's stages: long side ``n``, ``2n``, ``4n``, … below the target, then exactly the target."""
    long, side = max(height, width), native
    phases = []
    while side < long:
        phases.append(Phase(*canvas_at(height, width, side, grid), native))
        side *= 2
    return [*phases, Phase(height, width, native)]


def native_area_canvas(height: int, width: int, native: int, grid: int) -> tuple[int, int]:
    """About ``native²`` pixels at the target aspect: ``h0 = n·√(H/W)``, ``w0 = n/√(H/W)`` (AP-LDM, SPEC §5)."""
    ratio = math.sqrt(height / width)
    return round_to_grid(native * ratio, grid), round_to_grid(native / ratio, grid)


def area_steps(height: int, width: int, base: tuple[int, int], count: int, grid: int) -> list[tuple[int, int]]:
    """``count`` sizes spaced linearly in pixel area from ``base`` to the target; the last is the target exactly."""
    area0, area = base[0] * base[1], height * width
    sizes = []
    for i in range(1, count):
        a = area0 + i / count * (area - area0)
        sizes.append(
            (round_to_grid(math.sqrt(a * height / width), grid), round_to_grid(math.sqrt(a * width / height), grid))
        )
    return [*sizes, (height, width)]
