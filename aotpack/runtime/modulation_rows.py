"""Each step's modulation rows (recipe lever `batched_modulation`), computed once an image.

The rows are a function of (timestep, guidance, pooled text, LoRA state). A pipeline passes the same pooled and
guidance tensors at every step of an image, and its scheduler knows every timestep before the first one. So at an
image's first step the modulation program runs once over all of the scheduler's timesteps (one weight read instead
of one a step), and each later step takes its row from that table.

Which row: inside a verified call (`verified()`: an `AotpackPipeline` call, the benchmarks' loops, or a caller's
own `with transformer.verified_step_rows():`), where the followed pipeline says which of its scheduler's timesteps
it is at, the step takes that one without a device read. diffusers' Flux pipelines set `_current_timestep` to the
loop's `t`, a view of `scheduler.timesteps`, just before they call the transformer: its offset in that storage is
the step's index. That costs one device-to-host read an image (the schedule's values) instead of one a step, so
the host can queue the next step while the device runs this one: on an H100 a 28-step 512² image took 931.9 ms by
index against 935.1 with a read a step, 0.11 ms a step (2026-12-07k, random weights; the steps are GPU-bound, so
little more was there to win). The value still decides:
each such step queues a device-side comparison of the timestep it was passed with the one its index names, read
when the verified call ends, before its output is returned. A mismatch (a pipeline that passes other timesteps
than its `_current_timestep`) raises a typed error there, and from then on every step reads its timestep.
Where no pipeline says, the value is read (one device-to-host copy a step): a pipeline that passes
other timesteps (or none of the scheduler's) gets rows computed for the values it passed, never another step's.
Where no scheduler is followed, or the value is not in its schedule, the step computes its own rows (what the
block programs did before the lever). A table is kept per pooled tensor (a true-CFG pipeline has two), dropped with
that tensor, and not used after any write of the slot bank or a merge.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections import OrderedDict

import torch

from ..errors import UnsupportedCallError
from ..models.modulation import MAX_STEPS

logger = logging.getLogger(__name__)


def _version(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor has no version counter; it cannot be changed outside inference mode
        return 0


class _Table:
    def __init__(self, pooled, guidance, state, values: list[float], rows: torch.Tensor, on_drop):
        self.pooled = weakref.ref(pooled, on_drop)  # dropped with its pooled tensor (the image's end)
        self.guidance = None if guidance is None else weakref.ref(guidance)
        self.versions = (_version(pooled), _version(guidance))
        self.state = state
        self.index = {value: i for i, value in enumerate(values)}
        self.rows = rows  # [steps, batch * W]

    def serves(self, pooled, guidance, state) -> bool:
        same_guidance = (guidance is None and self.guidance is None) or (
            guidance is not None and self.guidance is not None and self.guidance() is guidance)
        return (self.pooled() is pooled and same_guidance and self.state == state
                and self.versions == (_version(pooled), _version(guidance)))


class ModulationRows:
    """Step rows for the block programs, from tables computed once an image (see the module docstring)."""

    max_tables = 4  # pooled tensors kept at once: two per image with true CFG, and one image to overlap
    max_table_bytes = 1 << 30  # a longer schedule is computed in windows from the current step

    def __init__(self, program, dtype: torch.dtype, width: int):
        self.program = program  # callable (pooled [S, B, P], timestep [S, B], guidance [S, B] | None) -> [S, B * W]
        self.dtype = dtype
        self.width = width  # W: all blocks' modulation widths
        self._scheduler = None  # a weak reference to what holds the schedule (a pipeline or a scheduler)
        self._tables: OrderedDict[int, _Table] = OrderedDict()
        self._next_key = 0
        self._told = False  # whether the missing-scheduler hint was logged
        self._listing = None  # (timesteps tensor's weak reference, its version, dtype, values, device schedule)
        self._unverified = None  # device bool: a step taken by index was passed another timestep (`verify`)
        self._verified_calls = 0  # open `verified()` scopes: only inside one may a step take its row by index
        self._by_index = True  # False after a mismatch: every step reads its timestep
        self.program_calls = 0  # how often the program ran, and over how many step rows (tests, benchmarks)
        self.rows_computed = 0
        self.host_reads = 0  # device-to-host reads of timesteps and checks (tests, benchmarks)

    def follow(self, holder) -> None:
        """Take each image's schedule from `holder`: a diffusers pipeline (its current `.scheduler`) or a
        scheduler. Kept by weak reference; None stops following."""
        self._scheduler = None if holder is None else weakref.ref(holder)
        self._tables.clear()
        self._listing = None

    def _timesteps(self) -> torch.Tensor | None:
        """The followed scheduler's `timesteps` (1-D tensor), or None."""
        holder = self._scheduler() if self._scheduler is not None else None
        timesteps = getattr(getattr(holder, "scheduler", holder), "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or timesteps.ndim != 1 or not len(timesteps):
            return None
        return timesteps

    def _step_index(self, timesteps: torch.Tensor | None) -> int | None:
        """The followed pipeline's step as an index into `timesteps`, read on the host: its `_current_timestep`
        (diffusers' Flux pipelines: the loop's `t`, a view of the scheduler's timesteps) located by storage offset;
        None where the pipeline does not say."""
        if not self._verified_calls or not self._by_index or timesteps is None:
            return None
        current = getattr(self._scheduler(), "_current_timestep", None)
        if (not isinstance(current, torch.Tensor) or current.ndim != 0 or timesteps.stride(0) != 1
                or current.untyped_storage().data_ptr() != timesteps.untyped_storage().data_ptr()):
            return None
        index = current.storage_offset() - timesteps.storage_offset()
        return index if 0 <= index < len(timesteps) else None

    def _listed(self, timesteps: torch.Tensor, timestep: torch.Tensor) -> tuple[list[float], torch.Tensor]:
        """`timesteps` as the pipeline passes them to the transformer (`t / 1000` in the latents' dtype, which the
        call's `timestep` has): host values and the device tensor, read once per schedule (one read an image)."""
        listing = self._listing
        if (listing is None or listing[0]() is not timesteps or listing[1] != _version(timesteps)
                or listing[2] != timestep.dtype):
            schedule = timesteps.to(device=timestep.device, dtype=timestep.dtype) / 1000
            values = schedule.float().tolist()
            self.host_reads += 1
            listing = self._listing = (weakref.ref(timesteps), _version(timesteps), timestep.dtype, values, schedule)
        return listing[3], listing[4]

    @contextlib.contextmanager
    def verified(self):
        """A scope whose steps may take their rows by their pipeline's index (module docstring); leaving it
        normally reads their queued checks (`verify`), so a wrong row raises before the scope's output is used.
        Left by an error, the checks are dropped with the output."""
        self._verified_calls += 1
        try:
            yield
        except BaseException:
            self._unverified = None
            raise
        finally:
            self._verified_calls -= 1
        self.verify()

    def verify(self) -> None:
        """Raise if a step whose row was taken by index was passed another timestep than the one its pipeline's
        `_current_timestep` named: that step ran another step's rows. One device read; a no-op where no step was
        taken by index since the last call."""
        flag, self._unverified = self._unverified, None
        if flag is None:
            return
        self.host_reads += 1
        if bool(flag):
            self._by_index = False
            self._tables.clear()
            raise UnsupportedCallError(
                "a step was passed another timestep than its pipeline's _current_timestep names, so its modulation "
                "rows were another step's: this call's output is wrong and was not returned",
                "call again: from now on each step reads its own timestep (one device-to-host copy a step). A "
                "custom pipeline should set _current_timestep to the scheduler's t it passes")

    def rows(self, pooled: torch.Tensor, timestep: torch.Tensor, guidance: torch.Tensor | None, state) -> torch.Tensor:
        """This step's `[batch * W]` rows. `state` is anything that changes when the LoRA-dependent rows do."""
        def own_rows():  # this step's alone, as the block programs computed them before the lever
            return self._compute(pooled, timestep.reshape(1, -1), guidance)[0]

        timesteps = self._timesteps()
        index = self._step_index(timesteps)
        if index is not None:
            listed, schedule = self._listed(timesteps, timestep)
            value = listed[index]
            mismatch = (timestep != value).any()  # queued: read when the verified scope ends
            self._unverified = mismatch if self._unverified is None else self._unverified | mismatch
        else:
            values = timestep.float().tolist()  # the device-to-host copy a step: the row is found by value
            self.host_reads += 1
            if len(set(values)) != 1:  # images at different steps in one batch
                return own_rows()
            value = values[0]
        for key, table in list(self._tables.items()):
            if table.pooled() is None:
                del self._tables[key]
            elif value in table.index and table.serves(pooled, guidance, state):
                self._tables.move_to_end(key)
                return table.rows[table.index[value]]
        if index is None:
            listed, schedule = ([], None) if timesteps is None else self._listed(timesteps, timestep)
            if value not in listed:  # no scheduler followed, or a timestep it does not list
                if self._scheduler is None and not self._told:  # the lever's gain needs the schedule: say how, once
                    self._told = True
                    logger.warning("this batched_modulation package computes its modulation rows at every step: "
                                   "call transformer.follow_scheduler(pipe) once to compute them once an image")
                return own_rows()
            index = listed.index(value)
        keep, chosen = set(), []
        for position in range(index, len(listed)):  # this step and the ones after it, each value once
            if listed[position] not in keep:
                keep.add(listed[position])
                chosen.append(position)
        row_bytes = timestep.shape[0] * self.width * self.dtype.itemsize
        chosen = chosen[:max(1, min(MAX_STEPS, self.max_table_bytes // max(row_bytes, 1)))]
        steps = schedule[torch.tensor(chosen, device=schedule.device)]
        batch = timestep.shape[0]
        rows = self._compute(pooled, steps[:, None].expand(len(chosen), batch), guidance)
        key = self._next_key = self._next_key + 1
        self._tables[key] = _Table(pooled, guidance, state, [listed[i] for i in chosen], rows,
                                   lambda _, key=key: self._tables.pop(key, None))
        while len(self._tables) > self.max_tables:
            self._tables.popitem(last=False)
        return rows[0]

    def _compute(self, pooled: torch.Tensor, timestep: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """The program over `timestep` `[S, B]` for this pooled text and guidance: `[S, B * W]`."""
        steps, batch = timestep.shape
        self.program_calls += 1
        self.rows_computed += steps
        pooled_rows = pooled.to(self.dtype).unsqueeze(0).expand(steps, *pooled.shape).contiguous()
        guidance_rows = None if guidance is None else guidance.to(self.dtype).unsqueeze(0).expand(steps, batch)
        return self.program(pooled_rows, timestep.to(self.dtype).contiguous(),
                            None if guidance_rows is None else guidance_rows.contiguous())

    def clear(self) -> None:
        self._tables.clear()
