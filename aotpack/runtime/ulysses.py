"""Ulysses sequence parallelism between the split block programs of a context-parallel package.

Every rank holds a shard of the joint sequence `[text; image]` (text and image tokens each cut
into N nearly equal pieces). Before attention an all-to-all trades the sequence shards of all
heads for all tokens of H/N heads; after attention the inverse all-to-all brings each rank its
tokens back with all heads. Attention sees the keys in rank order rather than `[text; image]`
order, which it does not depend on (no mask; only the summation order of the softmax changes).
With one rank nothing is communicated.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..models.split_regions import attention


def shard_sizes(total: int, parts: int) -> list[int]:
    """torch.tensor_split's sizes: the first `total % parts` shards one larger."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class CommTimer:
    """Time spent in collectives (CUDA events on GPUs: no synchronisation inside the step)."""

    def __init__(self, device: torch.device, enabled: bool = False):
        self.device, self.enabled = device, enabled
        self._events, self._seconds = [], 0.0

    def __call__(self, fn, *args):
        if not self.enabled:
            return fn(*args)
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args)
            end.record()
            self._events.append((start, end))
            return out
        started = time.perf_counter()
        out = fn(*args)
        self._seconds += time.perf_counter() - started
        return out

    def take_seconds(self) -> float:
        """Seconds measured since the last call (synchronises the device)."""
        if self._events:
            torch.cuda.synchronize(self.device)
            self._seconds += sum(s.elapsed_time(e) for s, e in self._events) / 1000
            self._events = []
        seconds, self._seconds = self._seconds, 0.0
        return seconds


class Ulysses:
    """The communication of one rank: head/sequence all-to-alls and the final all-gather."""

    def __init__(self, rank: int = 0, world_size: int = 1, group=None, device="cpu", attention_backend="sdpa",
                 overlap_chunks: int = 1):
        self.rank, self.world_size, self.group = rank, world_size, group
        self.device = torch.device(device)
        self.attention_backend = attention_backend
        self.timer = CommTimer(self.device)
        # > 1: each rank's heads go in that many chunks, so a chunk's all-to-all runs while another chunk
        # attends (`_attend_overlapped`); 1 (default until measured on two GPUs): one all-to-all each way.
        self.overlap_chunks = overlap_chunks

    def attend(self, qkv: torch.Tensor, seq_sizes: list[int]) -> torch.Tensor:
        """`[H, 3, B, S_rank, D]` q/k/v of this rank's tokens -> `[B, S_rank, H * D]` attention output."""
        n = self.world_size
        if n == 1:
            return self._attention(qkv).contiguous()
        chunks = self.overlap_chunks
        if chunks > 1 and (qkv.shape[0] // n) % chunks == 0:
            return self._attend_overlapped(qkv, seq_sizes, chunks)
        return self._attend_in_chunks(qkv, seq_sizes, 1)

    def _attend_overlapped(self, qkv: torch.Tensor, seq_sizes: list[int], chunks: int) -> torch.Tensor:
        """The overlapped path, under its own name so tests and benchmarks can tell which path ran."""
        return self._attend_in_chunks(qkv, seq_sizes, chunks)

    def _attend_in_chunks(self, qkv: torch.Tensor, seq_sizes: list[int], chunks: int) -> torch.Tensor:
        """All-to-all the sequence shards of all heads for all tokens of this rank's h = H/N heads, attend,
        and send each rank its tokens back with all heads.

        With `chunks` > 1 the h heads go in groups of c = h / chunks: every inbound all-to-all starts at
        once (asynchronous), chunk i attends as soon as its own arrived, and its output goes back
        asynchronously while chunk i + 1 attends; only the first inbound and the last outbound transfer
        stay exposed. The timer measures the waits on them (with one chunk: the transfers themselves).
        Head order: global head = rank * h + chunk * c + k, for any chunk count."""
        n = self.world_size
        heads, _, batch, local, head_dim = qkv.shape
        h = heads // n
        c = h // chunks
        grouped = qkv.view(n, chunks, c, 3, batch, local, head_dim)
        per_token = c * 3 * batch * head_dim
        inbound_sizes = [s * per_token for s in seq_sizes]
        sends = [grouped[:, i].contiguous() for i in range(chunks)]  # [n, c, 3, B, S_rank, D]: rank j gets [j]
        received = [torch.empty(sum(seq_sizes) * per_token, dtype=qkv.dtype, device=qkv.device)
                    for _ in range(chunks)]
        inbound = [dist.all_to_all_single(received[i], sends[i].reshape(-1), inbound_sizes,
                                          [local * per_token] * n, group=self.group, async_op=True)
                   for i in range(chunks)]
        out_per_token = batch * c * head_dim
        backs, outbound = [], []
        for i in range(chunks):
            self.timer(inbound[i].wait)
            # from rank j: [c, 3, B, S_j, D]; join the sequence pieces (rank order) for these c heads
            pieces = [p.view(c, 3, batch, s, head_dim) for p, s in zip(received[i].split(inbound_sizes), seq_sizes)]
            out = self._attention(torch.cat(pieces, dim=3))  # [B, S, c * D]
            send = out.view(batch, -1, c, head_dim).permute(1, 0, 2, 3).contiguous()  # [S, B, c, D]
            back = torch.empty(n * local * out_per_token, dtype=out.dtype, device=out.device)
            outbound.append((dist.all_to_all_single(back, send.reshape(-1), [local * out_per_token] * n,
                                                    [s * out_per_token for s in seq_sizes], group=self.group,
                                                    async_op=True), send))
            backs.append(back)
        for work, _send in outbound:  # _send stays referenced until its transfer is done
            self.timer(work.wait)
        # per chunk [N, S_rank, B, c, D] -> [N, S_rank, B, chunks, c, D] -> [B, S_rank, N * chunks * c * D]
        joined = (backs[0].view(n, local, batch, 1, c, head_dim) if chunks == 1
                  else torch.stack([b.view(n, local, batch, c, head_dim) for b in backs], dim=3))
        return joined.permute(2, 1, 0, 3, 4, 5).reshape(batch, local, heads * head_dim)

    def _attention(self, qkv: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda" or self.attention_backend in ("sdpa", "fa3"):
            return attention(qkv)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # The recipe's backend first; the others only if it refuses these strides/shapes (never an error).
        first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[self.attention_backend]
        others = [b for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                              SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != first]
        with sdpa_kernel([first, *others], set_priority=True):
            return attention(qkv)

    def gather_tokens(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's `[B, S_rank, C]` shard joined along the tokens, on every rank."""
        if self.world_size == 1:
            return x
        width = max(sizes)  # all_gather needs equal shapes: pad to the largest shard, trim after
        padded = torch.zeros((x.shape[0], width, *x.shape[2:]), dtype=x.dtype, device=x.device)
        padded[:, : x.shape[1]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self.timer(dist.all_gather, parts, padded, self.group)
        return torch.cat([p[:, :s] for p, s in zip(parts, sizes)], dim=1)
