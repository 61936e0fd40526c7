"""Options that several commands share."""

from __future__ import annotations

import click

from ..runtime.merge_policy import POLICY_NAMES

merge_policy_option = click.option(
    "--merge-policy", type=click.Choice(POLICY_NAMES), default="auto", show_default=True,
    help="When a LoRA set in slots is folded into the weights unasked: auto = once its steps pay for the merge "
         "(CUDA; measured break-even), never, or always.")
