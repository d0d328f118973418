"""Command-line pieces shared by every subcommand: the one-line-error :class:`Parser`, and the sampling settings
and ``--set`` options of ``generate``, ``bench`` and ``cost``. Torch-free (``--help`` imports it)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NoReturn

from hiresdiff.schedulers import ETA_SCHEDULERS, scheduler_names


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``PROG: error: MESSAGE (see PROG --help)``, with exit status 2
    (argparse prints its usage block, up to ~20 lines, before the message). Arguments no parser knows are reported
    by the subcommand that was given them (``hiresdiff generate: error: unrecognized arguments: --wdith``), not by
    the top-level parser. Subcommand parsers made by ``add_subparsers().add_parser`` are of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.chosen(parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def chosen(self, parsed: argparse.Namespace) -> Parser:
        """The innermost subcommand parser ``parsed`` went through (this parser when it has no subcommands)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                sub = action.choices.get(getattr(parsed, action.dest, None))
                if isinstance(sub, Parser):
                    return sub.chosen(parsed)
        return self


def add_sampling_options(p: argparse.ArgumentParser, *, set_help: str) -> None:
    """``--steps --guidance --scheduler --eta --negative --paper --max-batch --low-vram --set``; unset values stay
    ``None`` so the method's and :class:`~hiresdiff.config.GenerationSettings`' defaults apply (see
    :func:`sampling_settings`)."""
    p.add_argument(
        "--steps", type=int, default=None, help="inference steps N (default 50; FLUX-dev 30, FLUX-schnell 4)"
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale (default 7.5; FLUX-dev distilled guidance 3.5, FLUX-schnell 0)",
    )
    p.add_argument("--scheduler", default=None, help=f"one of: {', '.join(scheduler_names())} (default euler)")
    p.add_argument(
        "--eta",
        type=float,
        default=None,
        help=f"DDIM stochasticity η ≥ 0 (default 0; 1 = ancestral steps), with --scheduler {'/'.join(ETA_SCHEDULERS)}",
    )
    p.add_argument("--negative", default=None, help="negative prompt (default: the method's paper default)")
    p.add_argument(
        "--paper",
        action="store_true",
        help="the papers' sampling setting: DDIM, 50 steps, guidance 7.5, paper negative",
    )
    p.add_argument(
        "--max-batch",
        type=max_batch,
        default=None,
        help="most denoiser samples per forward pass, or auto: the most that fit the free memory by the estimate, "
        "keeping 10%% of it (at least 1 GiB) unused (default auto; 8 without an estimate)",
    )
    p.add_argument(
        "--max-pixels", type=int, default=None, help="largest image area allowed (default: (8 × native side)²)"
    )
    p.add_argument(
        "--low-vram",
        action="store_true",
        help="text encoders and VAE wait on the CPU between uses; --max-batch 1 and VAE tiles from 1024² by default",
    )
    p.add_argument(
        "--set", dest="params", action="append", default=[], metavar="NAME=VALUE", help=f"{set_help}; repeatable"
    )


def max_batch(text: str) -> int | str:
    """``--max-batch``: a whole number or ``auto`` (argparse names this function in its one-line error)."""
    word = text.strip().lower()
    return word if word == "auto" else int(word)


def add_memory_check_option(p: argparse.ArgumentParser) -> None:
    """``--skip-memory-check``: run even when the estimated peak memory (:mod:`hiresdiff.memory`) does not fit."""
    p.add_argument(
        "--skip-memory-check",
        action="store_true",
        help="run even when the estimated peak memory exceeds the device's free memory",
    )


def sampling_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling settings given on the command line (unset ones left out)."""
    values = {
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": args.scheduler,
        "eta": args.eta,
        "negative_prompt": args.negative,
        "max_batch": args.max_batch,
        "max_pixels": args.max_pixels,
        "low_vram": args.low_vram or None,
    }
    return {k: v for k, v in values.items() if v is not None}
