"""Ulysses sequence parallelism between the split block programs of a context-parallel package.

Every rank holds a shard of the joint sequence `[text; image]` (text and image tokens each cut
into N nearly equal pieces). Before attention an all-to-all trades the sequence shards of all
heads for all tokens of H/N heads; after attention the inverse all-to-all brings each rank its
tokens back with all heads. The received pieces are joined in the one-GPU order (all text, then
all image), so attention sums exactly as on one GPU: on the CPU two ranks are bit-identical to one.
On the H200 the FP8 GEMMs pick other kernels for other row counts, and any last-bit change grows
to 1.3e-2 relative at the output (FP8 roundings flip downstream; rank order alone does the same,
2026-12-01), while 1 and N ranks stay equally far from diffusers. With one rank nothing is
communicated.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..models.split_regions import attention, attention_per_head


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
                 overlap_chunks: int = 1, token_order: str = "joint"):
        self.rank, self.world_size, self.group = rank, world_size, group
        self.device = torch.device(device)
        self.attention_backend = attention_backend
        self.timer = CommTimer(self.device)
        # > 1: each rank's heads go in that many chunks, so a chunk's all-to-all runs while another chunk
        # attends (`_attend_overlapped`); 1 (default): one all-to-all each way. 2xH200, 1024^2, graphs:
        # 2 and 4 chunks 82.8-85.4 ms per step against 78.9-79.9 ms for 1 (2026-12-01, random weights).
        self.overlap_chunks = overlap_chunks
        # "joint": attention over [all text; all image], bit-identical to one GPU where the programs are
        # (CPU); "rank": rank 0's tokens, then rank 1's, ... (the received pieces joined as they are).
        # Same speed (79.4 ms either way, same run as above).
        self.token_order = token_order
        self._orders: dict[tuple, torch.Tensor] = {}  # _joint_to_rank_order's cache

    def attend(self, qkv: torch.Tensor, seq_sizes: list[int], text_sizes: list[int] | None = None) -> torch.Tensor:
        """`[H, 3, B, S_rank, D]` q/k/v of this rank's tokens -> `[B, S_rank, H * D]` attention output.

        `seq_sizes[j]`: rank j's token count, of which the first `text_sizes[j]` are text (None: no text);
        attention runs over all ranks' text tokens, then all ranks' image tokens (the one-GPU order)."""
        n = self.world_size
        if n == 1:
            return self._attention(qkv).contiguous()
        text_sizes = list(text_sizes) if text_sizes is not None and self.token_order == "joint" else [0] * n
        chunks = self.overlap_chunks
        if chunks > 1 and (qkv.shape[0] // n) % chunks == 0:
            return self._attend_overlapped(qkv, seq_sizes, text_sizes, chunks)
        return self._attend_in_chunks(qkv, seq_sizes, text_sizes, 1)

    def _attend_overlapped(self, qkv, seq_sizes: list[int], text_sizes: list[int], chunks: int) -> torch.Tensor:
        """The overlapped path, under its own name so tests and benchmarks can tell which path ran."""
        return self._attend_in_chunks(qkv, seq_sizes, text_sizes, chunks)

    def _joint_to_rank_order(self, seq_sizes: list[int], text_sizes: list[int]) -> torch.Tensor:
        """Indices into the one-GPU sequence `[text of ranks 0..N-1; image of ranks 0..N-1]` that list
        rank 0's tokens (its text, then its image), then rank 1's, ... (cached per shard layout)."""
        key = (tuple(seq_sizes), tuple(text_sizes))
        order = self._orders.get(key)
        if order is None:
            image_sizes = [s - t for s, t in zip(seq_sizes, text_sizes)]
            total_text = sum(text_sizes)
            parts = []
            for j in range(len(seq_sizes)):
                text_at, image_at = sum(text_sizes[:j]), total_text + sum(image_sizes[:j])
                parts += [torch.arange(text_at, text_at + text_sizes[j], device=self.device),
                          torch.arange(image_at, image_at + image_sizes[j], device=self.device)]
            order = self._orders[key] = torch.cat(parts)
        return order

    def _attend_in_chunks(self, qkv: torch.Tensor, seq_sizes: list[int], text_sizes: list[int],
                          chunks: int) -> torch.Tensor:
        """All-to-all the sequence shards of all heads for all tokens of this rank's h = H/N heads, attend
        (in the one-GPU token order), and send each rank its tokens back with all heads.

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
        order = self._joint_to_rank_order(seq_sizes, text_sizes)
        backs, outbound = [], []
        for i in range(chunks):
            self.timer(inbound[i].wait)
            # from rank j: [c, 3, B, S_j, D]; join every rank's text, then every rank's image (one-GPU order)
            pieces = [p.view(c, 3, batch, s, head_dim) for p, s in zip(received[i].split(inbound_sizes), seq_sizes)]
            texts = [p[:, :, :, :t] for p, t in zip(pieces, text_sizes) if t]
            images = [p[:, :, :, t:] for p, t in zip(pieces, text_sizes)]
            out = self._attention(torch.cat(texts + images, dim=3), per_head=True)  # [B, c, S, D]
            # [S, B, c, D] in rank order, one gather straight from SDPA's output: rank j's tokens are the
            # j-th slice sent back
            send = out.permute(2, 0, 1, 3).index_select(0, order)
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

    def _attention(self, qkv: torch.Tensor, per_head: bool = False) -> torch.Tensor:
        """`attention` (`[B, S, H * D]`), or with `per_head` `attention_per_head` (`[B, H, S, D]`)."""
        attend = attention_per_head if per_head else attention
        if self.device.type != "cuda" or self.attention_backend in ("sdpa", "fa3"):
            return attend(qkv)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # The recipe's backend first; the others only if it refuses these strides/shapes (never an error).
        first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[self.attention_backend]
        others = [b for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                              SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != first]
        with sdpa_kernel([first, *others], set_priority=True):
            return attend(qkv)

    @property
    def graph_variant(self) -> str:
        """What a captured step depends on besides its inputs (part of the CUDA-graph key)."""
        return f"overlap{self.overlap_chunks}/{self.token_order}"

    def all_agree(self, ok: bool) -> bool:
        """Whether `ok` holds on every rank (one small all-reduce; outside any graph capture)."""
        if self.world_size == 1:
            return ok
        flag = torch.tensor([int(ok)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

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
