"""Grouped LoRA projections: one matmul for the slots that read the same activation, one kernel for their outputs.

In a Flux block several slotted linears take the same input (`to_q`/`to_k`/`to_v`, the single
block's q/k/v and `proj_mlp`). Each slot's `x @ A.T` is a thin matmul (N = rank) that re-reads the
whole activation; grouped (`group_lora_down`), the program reads it once: `x @ cat(A_1..A_n).T`, split by rank.
Their up-projections `u_j @ B_j.T` then run as one `aotpack::lora_up` call (`group_lora_up`, models/lora_up.py): one
kernel launch for the group on CUDA instead of a cuBLAS GEMM (and often a memset) per slot; a lone slot's too.
Graph passes over the exported program, so the package's inputs (one A and one B per slot) stay the same.
"""

from __future__ import annotations

import operator

import torch
from torch._guards import detect_fake_mode
from torch.utils import _pytree as pytree

from ..errors import ExportError
from ..models import lora_up  # noqa: F401 -- registers torch.ops.aotpack.lora_up

aten = torch.ops.aten
_CASTS = (aten.to.dtype, aten._to_copy.default)


def _lora_placeholders(exported, suffix: str = ".lora_A") -> set[str]:
    """Placeholder names of the program's LoRA A (or B) inputs (from the pytree paths of its example inputs)."""
    flat, _ = pytree.tree_flatten_with_path(exported.example_inputs)
    names = set()
    for (path, _), placeholder in zip(flat, exported.graph_signature.user_inputs):
        last = path[-1] if path else None
        if isinstance(last, pytree.MappingKey) and str(last.key).endswith(suffix):
            names.add(placeholder)
    return names


def _is_noop_cast(node: torch.fx.Node) -> bool:
    """`x.to(dtype)` where x already has that dtype: export keeps the node, but it returns x itself."""
    return (node.op == "call_function" and node.target == aten.to.dtype and isinstance(node.args[0], torch.fx.Node)
            and node.args[0].meta["val"].dtype == node.meta["val"].dtype)


def _strip_noop_casts(node: torch.fx.Node) -> torch.fx.Node:
    while _is_noop_cast(node):
        node = node.args[0]
    return node


def _source_key(node: torch.fx.Node):
    """Down-projections read the same activation when their inputs are the same node, or the same cast of it."""
    node = _strip_noop_casts(node)
    if node.op == "call_function" and node.target in _CASTS:
        return (node.target, _strip_noop_casts(node.args[0]), tuple(node.args[1:]),
                tuple(sorted(node.kwargs.items(), key=str)))
    return node


def _slot_linears(graph: torch.fx.Graph, weights: set[str]) -> list[torch.fx.Node]:
    """The `linear(x, W)` nodes whose W is one of the placeholders `weights` (a slot's A or B)."""
    return [node for node in graph.nodes
            if node.op == "call_function" and node.target == aten.linear.default and len(node.args) == 2
            and not node.kwargs and getattr(node.args[1], "op", None) == "placeholder" and node.args[1].name in weights]


def down_projection_groups(graph: torch.fx.Graph, lora_a: set[str]) -> list[list[torch.fx.Node]]:
    """The `linear(x, A)` nodes of LoRA slots, grouped by the activation they read; groups of two or more."""
    groups: dict = {}
    for node in _slot_linears(graph, lora_a):
        groups.setdefault(_source_key(node.args[0]), []).append(node)
    return [members for members in groups.values() if len(members) > 1]


def _new_node(graph: torch.fx.Graph, target, args: tuple, value, like: torch.fx.Node) -> torch.fx.Node:
    """A call node carrying `value` as its fake `meta['val']`; the rest of the meta comes from `like`."""
    node = graph.call_function(target, args)
    node.meta.update({k: v for k, v in like.meta.items() if k != "val"})
    node.meta["val"] = value
    return node


def group_lora_down_projections(exported, kind: str = "program") -> int:
    """Rewrite `exported` in place so slots sharing an input run one grouped down-projection.

    Returns the number of down-projection matmuls removed (0 leaves the program untouched).
    """
    return _run_pass(_group, exported, f"grouping the LoRA down-projections of the {kind}", "group_lora_down")


def _run_pass(rewrite, exported, what: str, lever: str) -> int:
    try:
        return rewrite(exported)
    except Exception as err:  # a graph this pass does not understand: say which lever to turn off
        raise ExportError(f"{what} failed: {type(err).__name__}: {err}",
                          f"set {lever} = false in the recipe (a copy of aotpack/recipes/<target>.toml passed "
                          "as --target) and report the error") from err


def _group(exported) -> int:
    graph = exported.graph
    groups = down_projection_groups(graph, _lora_placeholders(exported))
    removed = 0
    for members in groups:
        first = members[0]  # graph order: its input is defined before every member
        source, weights = first.args[0], [m.args[1] for m in members]
        ranks = [int(w.meta["val"].shape[0]) for w in weights]
        x = source.meta["val"]
        # Output values are made, not computed: running aten.linear on fake tensors with symbolic token
        # counts fails in some torch releases (numel() of a symbolic size inside the matmul decomposition).
        with detect_fake_mode([x]):
            stacked_value = torch.cat([w.meta["val"] for w in weights], 0)
            grouped_value = x.new_empty((*x.shape[:-1], sum(ranks)))
            part_values = torch.split(grouped_value, ranks, -1)
        with graph.inserting_before(first):
            stacked = _new_node(graph, aten.cat.default, (weights, 0), stacked_value, first)
            grouped = _new_node(graph, aten.linear.default, (source, stacked), grouped_value, first)
            parts = _new_node(graph, aten.split_with_sizes.default, (grouped, ranks, -1), list(part_values), first)
            for index, member in enumerate(members):
                member.replace_all_uses_with(_new_node(graph, operator.getitem, (parts, index), part_values[index],
                                                       member))
        for member in members:
            graph.erase_node(member)
        removed += len(members) - 1
    if removed:
        graph.eliminate_dead_code()
        graph.lint()
        exported.graph_module.recompile()
    return removed


def up_projection_groups(graph: torch.fx.Graph, lora_b: set[str]) -> list[tuple[torch.fx.Node, list[torch.fx.Node]]]:
    """(u, the `linear(u_j, B_j)` nodes in u's column order) per group: the parts of one grouped down-projection
    (`getitem(split_with_sizes(u), j)`, every part feeding one up-projection), or a lone slot's `u`."""
    by_split: dict = {}
    found = []
    for node in _slot_linears(graph, lora_b):
        part = node.args[0]
        if (part.op == "call_function" and part.target == operator.getitem
                and part.args[0].target == aten.split_with_sizes.default):
            by_split.setdefault(part.args[0], {})[part.args[1]] = node
        else:
            found.append((part, [node]))
    for split, members in by_split.items():
        count = len(split.args[1])
        if sorted(members) == list(range(count)):
            found.append((split.args[0], [members[j] for j in range(count)]))
        else:  # a part with no up-projection or with two: each up-projection on its own part
            found += [(member.args[0], [member]) for member in members.values()]
    return found


def group_lora_up_projections(exported, kind: str = "program") -> int:
    """Rewrite `exported` in place so each group's up-projections (and each lone slot's) run as one
    `aotpack::lora_up` call, whose output the slots read as column views. Returns the number of up-projection
    matmuls it replaced (0 leaves the program as is).
    """
    return _run_pass(_group_up, exported, f"grouping the LoRA up-projections of the {kind}", "group_lora_up")


def _group_up(exported) -> int:
    graph = exported.graph
    order = {node: index for index, node in enumerate(graph.nodes)}
    replaced = 0
    for u, members in up_projection_groups(graph, _lora_placeholders(exported, ".lora_B")):
        weights = [member.args[1] for member in members]
        values = [member.meta["val"] for member in members]
        widths = [int(value.shape[-1]) for value in values]
        with detect_fake_mode(values):
            joined_value = torch.cat(values, -1)
            part_values = torch.split(joined_value, widths, -1)
        with graph.inserting_before(min(members, key=order.__getitem__)):  # before every member's users
            call = _new_node(graph, torch.ops.aotpack.lora_up.default, (u, weights), joined_value, members[0])
            parts = _new_node(graph, aten.split_with_sizes.default, (call, widths, -1), list(part_values), members[0])
            for index, member in enumerate(members):
                member.replace_all_uses_with(_new_node(graph, operator.getitem, (parts, index), part_values[index],
                                                       member))
        for member in members:
            graph.erase_node(member)
        replaced += len(members)
    if replaced:
        graph.eliminate_dead_code()
        graph.lint()
        exported.graph_module.recompile()
    return replaced
