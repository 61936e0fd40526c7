"""The forward of a split (context-parallel) package on one rank: prologue, the block programs with
Ulysses attention between them, epilogue on this rank's token shard, gathered. World size 1 runs the
same code with no communication. Rank processes and their launch live in parallel.py."""

from __future__ import annotations

import torch

from ..errors import AotpackError
from ..models.regions import EPILOGUE, PROLOGUE, run_joint
from ..models.split_regions import DOUBLE_POST, DOUBLE_PRE, SINGLE_POST, SINGLE_PRE
from .ulysses import Ulysses, shard_sizes


def communicator(transformer) -> Ulysses:
    """The transformer's rank communicator: the one `parallel.attach` gave it, else one rank's own."""
    comm = getattr(transformer, "context_parallel", None)
    if comm is None:
        comm = transformer.context_parallel = Ulysses(device=transformer.device,
                                                      attention_backend=transformer.manifest.attention)
    return comm


def split_forward(transformer, inputs: list[torch.Tensor], programs: dict | None = None) -> torch.Tensor:
    """The transformer forward of a split package on this rank (any world size, 1 included);
    `programs` are the instances to run by kind (the transformer's choice of variant)."""
    comm = communicator(transformer)
    programs = programs or transformer._programs
    hidden, encoder, temb, cos, sin = programs[PROLOGUE][0](*inputs)
    n, rank = comm.world_size, comm.rank
    text_sizes, image_sizes = shard_sizes(encoder.shape[1], n), shard_sizes(hidden.shape[1], n)
    text_at, image_at = sum(text_sizes[:rank]), sum(image_sizes[:rank])
    text, image = text_sizes[rank], image_sizes[rank]
    if min(text_sizes + image_sizes) < 2:  # the split programs are compiled for shards of >= 2 tokens
        raise AotpackError(f"{encoder.shape[1]} text and {hidden.shape[1]} image tokens are too few for {n} ranks",
                           "use fewer GPUs or a larger image / longer max_sequence_length")
    if n > 1:
        hidden = hidden[:, image_at:image_at + image].contiguous()
        encoder = encoder[:, text_at:text_at + text].contiguous()
        rows = torch.cat([torch.arange(text_at, text_at + text, device=cos.device),  # on the device: capturable
                          torch.arange(image_at, image_at + image, device=cos.device) + sum(text_sizes)])
        cos, sin = cos.index_select(0, rows), sin.index_select(0, rows)
    seq_sizes = [t + i for t, i in zip(text_sizes, image_sizes)]
    for pre, post in zip(programs.get(DOUBLE_PRE, []), programs.get(DOUBLE_POST, [])):
        qkv, modulation = pre(hidden, encoder, temb, cos, sin)
        encoder, hidden = post(comm.attend(qkv, seq_sizes, text_sizes), hidden, encoder, modulation)
    def single(pre, post):  # on this rank's [text; image] shard
        def run(joint):
            qkv, mlp, gate = pre(joint, temb, cos, sin)
            return post(comm.attend(qkv, seq_sizes, text_sizes), mlp, gate, joint)
        return run

    singles = [single(pre, post) for pre, post in zip(programs.get(SINGLE_PRE, []), programs.get(SINGLE_POST, []))]
    hidden = run_joint(singles, hidden, encoder)
    sample = programs[EPILOGUE][0](hidden, temb)  # per token: runs on the shard, gathered after
    if isinstance(sample, (tuple, list)):
        (sample,) = sample
    return comm.gather_tokens(sample, image_sizes)
