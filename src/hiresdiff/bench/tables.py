"""The papers' comparison tables as data, for ``hiresdiff reproduce TABLE`` (torch-free).

Each :class:`PaperTable` says what a table of a paper measured — its rows (the label printed in the paper → a
hiresdiff method, preset and ``--set`` values, or why hiresdiff cannot run it), its sizes (as multiples of the
paper model's native side, so that the same table runs on a tiny model at the same scale factors), its sampling
setting, its metrics and crop protocol (the README's eval crops table) — and the numbers the paper published, as
printed, transcribed from the papers' text in ``shared/papers/``. :func:`row_problem` decides at run time whether
a row can run (a method added later to the registry makes its row runnable without editing this file).

Published numbers are kept as the paper prints them, one string per row and size with the values in the table's
metric order: a number, ``55s`` / ``13min`` for times, ``–`` where the paper has no value
(:func:`published_values` parses them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hiresdiff.errors import HiresError, require

#: the native side of the models the papers used (SDXL): sizes are stored as multiples of it
PAPER_NATIVE = 1024
#: seconds per unit of a printed time
_TIME = re.compile(r"^(\d+(?:\.\d+)?)(s|min)$")
_MISSING = ("–", "-", "—")


@dataclass(frozen=True)
class PaperSize:
    """A size of a table: as printed, and as multiples of the paper model's native side (width, height)."""

    label: str
    width_factor: float
    height_factor: float

    def pixels(self, native: int) -> tuple[int, int]:
        """(width, height) in pixels for a model whose native side is ``native``."""
        return round(self.width_factor * native), round(self.height_factor * native)


def _size(width: int, height: int) -> PaperSize:
    """A size printed as ``width×height`` pixels of SDXL (1024² native)."""
    return PaperSize(f"{width}×{height}", width / PAPER_NATIVE, height / PAPER_NATIVE)


@dataclass(frozen=True)
class TableRow:
    """One row: the paper's label, the hiresdiff run that stands for it (``method``, ``preset``, ``sets``) or
    ``why`` it cannot run, and the published numbers per size label (see the module docstring)."""

    label: str
    method: str | None
    preset: str | None = None
    sets: tuple[tuple[str, str], ...] = ()
    why: str | None = None
    published: dict[str, str] = field(default_factory=dict)

    @property
    def run_label(self) -> str:
        """``method:preset name=value …`` as on the bench command line."""
        head = f"{self.method}:{self.preset}" if self.preset else str(self.method)
        return " ".join([head, *(f"{k}={v}" for k, v in self.sets)])


@dataclass(frozen=True)
class PaperTable:
    """One table of a paper and how to regenerate it.

    ``metrics`` are ``(header as printed, report column)`` pairs; report columns are the bench's metric columns
    (``FID`` … ``CLIPIQA``, see :data:`hiresdiff.bench.rows.METRICS`) or ``Time`` (seconds per image).
    ``eval_metrics`` are the ``hiresdiff eval`` metric names that fill them (crop variants come from ``crops``).
    ``paper_setting`` applies ``--paper`` (DDIM, 50 steps, guidance 7.5, the DemoFusion negative prompt) under the
    presets; ``settings`` are further sampling settings (explicit, so they win over presets).
    """

    name: str
    title: str
    source: str
    model: str
    sizes: tuple[PaperSize, ...]
    metrics: tuple[tuple[str, str], ...]
    eval_metrics: tuple[str, ...]
    crops: str
    prompts: str
    rows: tuple[TableRow, ...]
    paper_setting: bool = False
    settings: dict[str, object] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(column for _, column in self.metrics)


def _rows(
    sizes: tuple[PaperSize, ...], entries: tuple[tuple[str, str | None, str | None, str | None, tuple[str, ...]], ...]
) -> tuple[TableRow, ...]:
    """Rows from ``(label, method, preset, why, published cells per size)`` entries."""
    labels = [s.label for s in sizes]
    return tuple(
        TableRow(label, method, preset, why=why, published=dict(zip(labels, cells, strict=True)))
        for label, method, preset, why, cells in entries
    )


SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
TRAINING_BASED = "not runnable: training-based (a model trained for high resolutions), not a training-free method"
SR_MODEL = "not runnable yet: needs a BSRGAN super-resolution model file (`--upscaler`, issue 24 item 5)"
OSEDIFF = "not runnable: OSEDiff is a trained one-step diffusion super-resolution model, not in hiresdiff"
APT_METRICS = (("MUSIQ", "MUSIQ"), ("CLIPIQA", "CLIPIQA"), ("FIDc", "FIDc"), ("KIDc", "KIDc"), ("Time", "Time"))
APT_PROMPTS = "1,000 OpenImages images above 3K, centre-cropped square, BLIP2 captions (`hiresdiff dataset`)"

APT_TABLE1 = PaperTable(
    name="apt-table1",
    title="APT Table 1: training-free methods on SDXL at 2048² and 4096², with and without APT",
    source="APT (Han et al. 2025, arXiv 2507.21690), Table 1",
    model=SDXL,
    sizes=(_size(2048, 2048), _size(4096, 4096)),
    metrics=APT_METRICS,
    eval_metrics=("musiq", "clipiqa", "fid", "kid"),
    crops="fixed:50000x299",
    prompts=APT_PROMPTS,
    paper_setting=True,
    rows=(
        TableRow(
            "SDXL Direct Inference",
            "direct",
            published={"2048×2048": "58.1 0.585 57.7 0.0297 55s", "4096×4096": "33.7 0.549 86.6 0.0489 13min"},
        ),
        TableRow(
            "ScaleCrafter",
            "scalecrafter",
            "official",
            published={"2048×2048": "60.8 0.619 35.5 0.0103 63s", "4096×4096": "38.0 0.530 54.9 0.0103 22min"},
        ),
        TableRow(
            "FouriScale",
            "fouriscale",
            "official",
            published={"2048×2048": "56.0 0.584 53.2 0.0183 127s", "4096×4096": "31.8 0.515 77.0 0.0260 –"},
        ),
        TableRow(
            "HiDiffusion",
            "hidiffusion",
            "official",
            published={"2048×2048": "59.9 0.607 38.0 0.0114 39s", "4096×4096": "39.9 0.554 127.4 0.0787 4min"},
        ),
        TableRow(
            "DemoFusion",
            "apt",
            "demofusion",
            published={"2048×2048": "56.6 0.587 42.5 0.0211 168s", "4096×4096": "38.9 0.548 33.6 0.0117 22min"},
        ),
        TableRow(
            "DemoFusion (30/50)",
            "apt",
            "demofusion-shortcut",
            published={"2048×2048": "53.3 0.545 46.3 0.0231 106s", "4096×4096": "36.9 0.517 37.2 0.0133 13min"},
        ),
        TableRow(
            "DemoFusion +APT",
            "apt",
            "apt",
            published={"2048×2048": "59.0 0.632 37.1 0.0160 106s", "4096×4096": "40.3 0.598 31.5 0.0104 13min"},
        ),
        TableRow(
            "AccDiffusion",
            "apt",
            "accdiffusion",
            published={"2048×2048": "56.9 0.569 36.5 0.0174 173s", "4096×4096": "38.7 0.536 33.7 0.0113 23min"},
        ),
        TableRow(
            "AccDiffusion (30/50)",
            "apt",
            "accdiffusion-shortcut",
            published={"2048×2048": "50.5 0.516 46.1 0.0230 109s", "4096×4096": "36.5 0.485 38.0 0.0127 14min"},
        ),
        TableRow(
            "AccDiffusion +APT",
            "apt",
            "accdiffusion-apt",
            published={"2048×2048": "56.6 0.595 37.6 0.0175 109s", "4096×4096": "40.3 0.557 33.8 0.0131 14min"},
        ),
    ),
    notes=(
        "The text lost the FIDc/KIDc headers (subscripts): the columns are read as MUSIQ, CLIPIQA, FIDc, KIDc, Time "
        "from the values (FIDc tens, KIDc hundredths) and Section 5.1.",
        "The two shortcut rows have no label in the text (only their relative changes); they are the naive 30/50 "
        "versions that Section 5.2 describes.",
        "The crop size is not in the text (the appendix labels FID299/KID299, hence 299 px); 50,000 crops.",
        "Times: NVIDIA RTX A5000; the paper's 'HiDiffuion' is HiDiffusion. DDIM, fixed DemoFusion negative prompt "
        "for every model (Appendix B.1): `--paper`; guidance is not stated (7.5 assumed).",
    ),
)

APT_TABLE2 = PaperTable(
    name="apt-table2",
    title="APT Table 2: ablation of statistical matching (SM) and scale-aware scheduling (SaS) over DemoFusion",
    source="APT (Han et al. 2025, arXiv 2507.21690), Table 2",
    model=SDXL,
    sizes=(_size(3072, 3072),),
    metrics=APT_METRICS,
    eval_metrics=("musiq", "clipiqa", "fid", "kid"),
    crops="fixed:50000x299",
    prompts="400 OpenImages images above 3K (the validation set, disjoint from Table 1's), BLIP2 captions",
    paper_setting=True,
    rows=(
        TableRow("DemoFusion (50/50)", "apt", "demofusion", published={"3072×3072": "43.42 0.549 40.72 0.019 11min"}),
        TableRow(
            "DemoFusion (30/50)", "apt", "demofusion-shortcut", published={"3072×3072": "38.32 0.476 49.10 0.022 6min"}
        ),
        TableRow("+ SM only", "apt", "apt-sm", published={"3072×3072": "43.83 0.557 38.92 0.016 6min"}),
        TableRow("+ SaS only", "apt", "apt-sas", published={"3072×3072": "45.55 0.587 40.80 0.018 6min"}),
        TableRow("+ SM + SaS (APT)", "apt", "apt", published={"3072×3072": "46.54 0.606 38.24 0.007 6min"}),
    ),
    notes=(
        "The size of Table 2 is not printed next to it: Appendix B.1 says every validation run is at 3K, hence "
        "3072×3072; its times (11 min for DemoFusion) fit between Table 1's 2048² and 4096² times.",
        "Columns as in Table 1 (MUSIQ, CLIPIQA, FIDc, KIDc, Time; the FIDc/KIDc headers are lost in the text).",
    ),
)

APLDM_SIZES = (_size(2048, 1024), _size(2048, 2048), _size(4096, 2048), _size(4096, 4096))
APLDM_TABLE1 = PaperTable(
    name="apldm-table1",
    title="AP-LDM Table 1: training-free methods on SDXL at four resolutions (FID, IS, FIDc, ISc, CLIP)",
    source="AP-LDM (Cao et al. 2024, arXiv 2410.06055), Table 1",
    model=SDXL,
    sizes=APLDM_SIZES,
    metrics=(("FID", "FID"), ("IS", "IS"), ("FIDc", "FIDc"), ("ISc", "ISc"), ("CLIP", "CLIP")),
    eval_metrics=("fid", "is", "clip"),
    crops="windows:10",
    prompts="SAM images and captions: 2,000 prompts at the smallest size, 1,000 above it",
    settings={"steps": 50, "guidance": 7.5},
    rows=_rows(
        APLDM_SIZES,
        (
            (
                "SDXL",
                "direct",
                None,
                None,
                (
                    "99.9 14.2 80.0 16.9 25.0",
                    "149.9 9.5 106.3 12.0 24.4",
                    "173.1 9.1 108.5 11.5 23.9",
                    "191.4 8.3 114.1 12.4 22.9",
                ),
            ),
            (
                "MultiDiff.",
                "multidiffusion",
                None,
                None,
                (
                    "98.8 14.5 67.9 17.1 24.6",
                    "125.8 9.6 71.9 15.7 24.6",
                    "149.0 9.0 70.5 14.4 24.4",
                    "168.4 6.5 76.6 14.4 23.1",
                ),
            ),
            (
                "ScaleCrafter",
                "scalecrafter",
                None,
                None,
                (
                    "98.2 14.2 89.7 13.3 25.4",
                    "161.9 10.0 154.3 7.5 23.3",
                    "175.1 9.7 167.3 8.0 21.6",
                    "164.5 9.4 170.1 7.3 22.3",
                ),
            ),
            (
                "UG",
                "upsample-guidance",
                None,
                None,
                (
                    "82.2 17.6 65.8 14.6 25.5",
                    "155.7 8.2 165.0 6.6 21.7",
                    "185.3 6.8 175.7 6.2 20.5",
                    "187.3 7.0 197.6 6.3 21.8",
                ),
            ),
            (
                "DemoFusion",
                "demofusion",
                None,
                None,
                (
                    "72.3 21.6 53.5 19.1 25.2",
                    "96.3 17.7 62.3 15.0 25.0",
                    "99.6 16.4 61.9 14.7 24.4",
                    "101.4 20.7 63.5 13.5 24.7",
                ),
            ),
            (
                "AccDiff.",
                "accdiffusion",
                None,
                None,
                (
                    "71.6 21.0 52.7 17.0 25.1",
                    "95.5 16.4 62.9 11.1 24.5",
                    "102.2 15.2 65.4 11.5 24.2",
                    "103.2 20.1 65.9 13.3 24.6",
                ),
            ),
            (
                "AP-LDM",
                "apldm",
                None,
                None,
                (
                    "66.0 21.0 47.4 17.5 25.1",
                    "89.0 20.3 56.0 19.0 25.0",
                    "93.2 19.5 56.9 16.5 24.9",
                    "90.6 21.1 59.0 14.8 24.6",
                ),
            ),
        ),
    ),
    notes=(
        'The text lost the four resolutions ("(Height × Width): , , , and"). Assumed here, smallest first: '
        "1024×2048, 2048×2048, 2048×4096 and 4096×4096 (H×W; printed here as W×H): the text names one "
        "smallest size with more prompts, an aspect-ratio case, and 4096² as the largest; its Table 2 times equal "
        "DemoFusion's at 2048², 2048×4096 and 4096². Check against the PDF before quoting.",
        "Euler scheduler, guidance 7.5, FreeU off for every method (Section 4.1); AP-LDM's own defaults "
        "(progressive 0.2 below 4096², 0.1,0.2 at 4096²) are hiresdiff's.",
        "Time per image is in the paper's Table 2 (3 sizes, minutes on an RTX 3090), not in Table 1.",
    ),
)

DEMOFUSION_SIZES = (_size(2048, 2048), _size(4096, 2048), _size(4096, 4096))
DEMOFUSION_TABLE1 = PaperTable(
    name="demofusion-table1",
    title="DemoFusion Table 1: SDXL direct, MultiDiffusion, SDXL+BSRGAN, ScaleCrafter and DemoFusion",
    source="DemoFusion (Du et al. 2024, CVPR, arXiv 2311.16973), Table 1",
    model=SDXL,
    sizes=DEMOFUSION_SIZES,
    metrics=(
        ("FID", "FID"),
        ("IS", "IS"),
        ("FID_crop", "FIDc"),
        ("IS_crop", "ISc"),
        ("CLIP", "CLIP"),
        ("Time", "Time"),
    ),
    eval_metrics=("fid", "is", "clip"),
    crops="native",
    prompts="1,000 random LAION-5B captions (and their images as the reference)",
    settings={"steps": 50, "guidance": 7.5},
    rows=_rows(
        DEMOFUSION_SIZES,
        (
            (
                "SDXL Direct Inference",
                "direct",
                None,
                None,
                (
                    "79.66 13.47 73.91 17.38 28.12 1min",
                    "97.08 14.12 96.41 18.01 27.29 3min",
                    "105.65 14.01 98.59 19.47 25.64 8min",
                ),
            ),
            (
                "MultiDiffusion",
                "multidiffusion",
                None,
                None,
                (
                    "75.93 14.56 70.93 17.85 28.97 3min",
                    "89.38 14.17 82.78 18.87 28.66 6min",
                    "97.98 13.84 79.45 19.73 28.62 15min",
                ),
            ),
            (
                "SDXL + BSRGAN",
                None,
                None,
                SR_MODEL,
                (
                    "66.41 16.22 67.42 21.11 29.61 1min",
                    "68.70 16.29 75.03 21.76 29.01 1min",
                    "66.44 16.21 77.20 22.42 29.63 1min",
                ),
            ),
            (
                "ScaleCrafter",
                "scalecrafter",
                "official",
                None,
                (
                    "69.91 15.72 68.36 19.44 29.51 1min",
                    "80.16 15.29 83.08 19.56 28.87 6min",
                    "87.50 15.20 84.36 20.32 29.04 19min",
                ),
            ),
            (
                "DemoFusion (Ours)",
                "demofusion",
                None,
                None,
                (
                    "65.73 16.41 64.81 21.40 29.68 3min",
                    "73.15 16.37 71.35 23.55 29.05 11min",
                    "74.11 16.11 70.34 24.28 29.57 25min",
                ),
            ),
        ),
    ),
    notes=(
        "The paper prints the middle size as 2048 × 4096 without saying which side is the height; read as H×W "
        "(landscape, 4096×2048 here as W×H) like AP-LDM, which reuses these times.",
        "FID_crop/IS_crop: one native-size (1024²) crop per image; the number of crops is not stated (use "
        "`--crops windows:K` for more). Times on an RTX 3090, in whole minutes.",
        "DemoFusion's code samples with Euler at guidance 7.5 over 50 steps (hiresdiff's defaults).",
    ),
)

SCALEDIFF_SIZES = (_size(2048, 2048), _size(4096, 4096))
SCALEDIFF_TABLE2 = PaperTable(
    name="scalediff-table2",
    title="ScaleDiff Table 2 (SDXL part): training-free, super-resolution and training-based methods at 2048², 4096²",
    source="ScaleDiff (Higher-Resolution Image Synthesis via Efficient and Model-Agnostic Diffusion), Table 2 (SDXL)",
    model=SDXL,
    sizes=SCALEDIFF_SIZES,
    metrics=(
        ("FID", "FID"),
        ("KID", "KID"),
        ("IS", "IS"),
        ("FIDp", "FIDc"),
        ("KIDp", "KIDc"),
        ("ISp", "ISc"),
        ("CLIP", "CLIP"),
        ("Time", "Time"),
    ),
    eval_metrics=("fid", "kid", "is", "clip"),
    crops="native",
    prompts="1,000 random LAION-5B image-text pairs, one image per prompt",
    settings={"steps": 50},
    rows=_rows(
        SCALEDIFF_SIZES,
        (
            (
                "SDXL Direct",
                "direct",
                None,
                None,
                ("88.56 0.0124 13.25 58.73 0.0137 20.79 31.57 47s", "182.05 0.0717 7.99 80.80 0.0250 17.68 27.82 328s"),
            ),
            (
                "SDXL + BSRGAN",
                None,
                None,
                SR_MODEL,
                ("64.60 0.0041 18.40 41.40 0.0092 23.19 33.03 13s", "64.88 0.0044 18.16 48.97 0.0160 17.04 33.02 14s"),
            ),
            (
                "SDXL + OSEDiff",
                None,
                None,
                OSEDIFF,
                ("64.79 0.0046 18.89 41.76 0.0094 23.58 32.79 29s", "65.35 0.0045 18.69 45.67 0.0118 17.61 32.88 122s"),
            ),
            (
                "UltraPixel",
                None,
                None,
                TRAINING_BASED,
                ("64.61 0.0056 18.58 42.44 0.0093 25.15 32.61 71s", "65.39 0.0055 19.08 47.09 0.0112 20.64 32.33 386s"),
            ),
            (
                "ScaleCrafter",
                "scalecrafter",
                "official",
                None,
                ("68.68 0.0033 16.56 43.46 0.0064 23.52 32.07 64s", "86.66 0.0110 15.14 79.39 0.0217 14.47 30.25 932s"),
            ),
            (
                "HiDiffusion",
                "hidiffusion",
                "official",
                None,
                (
                    "69.52 0.0040 18.22 42.92 0.0067 24.01 31.50 33s",
                    "105.37 0.0216 13.87 112.30 0.0494 12.22 27.21 124s",
                ),
            ),
            (
                "DiffuseHigh",
                "diffusehigh",
                "official",
                None,
                ("63.27 0.0033 19.10 38.15 0.0062 24.95 32.77 45s", "63.91 0.0034 18.99 42.30 0.0079 19.54 32.68 325s"),
            ),
            (
                "FreeScale",
                "freescale",
                "official",
                None,
                ("63.50 0.0031 19.06 38.27 0.0062 24.25 32.62 69s", "64.33 0.0036 19.18 39.56 0.0079 18.91 32.56 517s"),
            ),
            (
                "AccDiffusion v2",
                "accdiffusion-v2",
                None,
                None,
                (
                    "64.86 0.0039 18.37 38.24 0.0068 25.66 32.62 199s",
                    "64.64 0.0037 18.56 40.92 0.0083 18.42 32.34 1599s",
                ),
            ),
            (
                "Demofusion",
                "demofusion",
                None,
                None,
                (
                    "63.36 0.0032 19.15 35.98 0.0050 26.42 32.72 125s",
                    "65.06 0.0041 19.13 41.29 0.0079 19.59 32.61 1005s",
                ),
            ),
            (
                "ScaleDiff (Ours)",
                "scalediff",
                None,
                None,
                ("62.98 0.0032 19.54 38.03 0.0067 25.70 33.11 31s", "61.87 0.0025 19.56 38.89 0.0080 20.41 33.04 113s"),
            ),
        ),
    ),
    notes=(
        "The text lost the two resolutions; Section 4.2 ('for 4096² … 113 seconds') fixes the second block as "
        "4096×4096 and the first as 2048×2048. Only the SDXL rows are encoded; the FLUX rows (FLUX direct, "
        "FLUX + BSRGAN/OSEDiff, ScaleDiff) are not.",
        "FIDp/KIDp/ISp: patches following DemoFusion (native-size crops); the number per image is not stated. "
        "Times in seconds on an NVIDIA A6000. Baselines run with their official presets where hiresdiff has one.",
    ),
)

TABLES: dict[str, PaperTable] = {
    t.name: t for t in (APT_TABLE1, APT_TABLE2, APLDM_TABLE1, DEMOFUSION_TABLE1, SCALEDIFF_TABLE2)
}


def get_table(name: str) -> PaperTable:
    """The table called ``name``, or a one-line error listing the tables."""
    try:
        return TABLES[name]
    except KeyError:
        raise HiresError(f"unknown table {name!r}; choose one of: {', '.join(TABLES)}") from None


def row_problem(row: TableRow) -> str | None:
    """Why ``row`` cannot run with this hiresdiff (``None`` when it can): the row's own reason, a method not in
    the registry, a preset or a ``--set`` name the method lacks. Checked at run time, so methods added later count."""
    import dataclasses

    from hiresdiff.methods import METHODS

    if row.why is not None:
        return row.why
    method = METHODS.get(str(row.method))
    if method is None:
        return f"not runnable yet: hiresdiff has no method {row.method!r}"
    if method.own_control:
        return f"not runnable yet: {row.method!r} needs a canny SDXL ControlNet, which bench does not load"
    if row.preset is not None and row.preset not in method.presets:
        return f"not runnable yet: method {row.method!r} has no preset {row.preset!r}"
    names = {f.name for f in dataclasses.fields(method.params)}
    missing = [k for k, _ in row.sets if k not in names]
    return f"not runnable yet: method {row.method!r} has no parameter {missing[0]!r}" if missing else None


def parse_value(text: str) -> float | None:
    """A printed cell: a number, a time (``55s``, ``13min`` → seconds) or ``–`` (``None``)."""
    if text in _MISSING:
        return None
    if m := _TIME.match(text):
        return float(m[1]) * (60 if m[2] == "min" else 1)
    try:
        return float(text)
    except ValueError:
        raise HiresError(f"published value {text!r} is neither a number, a time like 55s/13min, nor –") from None


def published_values(table: PaperTable, row: TableRow) -> dict[str, dict[str, float | None]]:
    """The row's published numbers: size label → report column → value (``None`` where the paper has none)."""
    out: dict[str, dict[str, float | None]] = {}
    for size, text in row.published.items():
        cells = text.split()
        require(
            len(cells) == len(table.metrics),
            f"{table.name}, {row.label!r} at {size}: {len(cells)} published values for {len(table.metrics)} metrics",
        )
        out[size] = {column: parse_value(cell) for column, cell in zip(table.columns, cells, strict=True)}
    return out
