"""Options that several commands share."""

from __future__ import annotations

import math

import click

from ..runtime.merge_policy import POLICY_NAMES


class FiniteFloat(click.FloatRange):
    """click's `FloatRange` that also refuses nan and +-inf as a usage error (exit 2): nan passes every bound
    (each comparison with it is False), and inf passes a bound below (`--cache-gb inf`)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number!r} is not a finite number.", param, ctx)
        return number


merge_policy_option = click.option(
    "--merge-policy", type=click.Choice(POLICY_NAMES), default="auto", show_default=True,
    help="When a LoRA set in slots is folded into the weights unasked: auto = once its steps pay for the merge "
         "(CUDA; measured break-even), never, or always.")

merge_share_option = click.option(
    "--merge-share", type=FiniteFloat(0, 1, min_open=True), default=1.0, show_default=True,
    help="Share of a LoRA set's block weights that a merge folds in (asked or by --merge-policy); the rest stays "
         "in slots. Below 1: less FP8 re-rounding of the LoRA, for part of the merge's speed (docs/merging.md).")
