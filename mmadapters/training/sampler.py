"""The training data stream: which items each optimizer step sees, on each rank, in each micro-batch.

**Mixed batches** (the default). The stream is a concatenation of permutations of ``range(train_size)``, epoch
``e``'s permutation drawn from ``(seed, e)`` alone; step ``s`` takes stream positions ``[s * B, (s + 1) * B)``
(B: the GLOBAL batch size, the items of one optimizer step).

**One group per batch** (a task with ``batch_groups()``, e.g. VL-Adapter's tasks: the paper draws every batch
from one task). Each group ``g`` has its own stream, the concatenation of permutations of its items, group epoch
``e`` drawn from ``(seed, g, e)``. Steps come in rounds of ``R = sum_g ceil(n_g / B)`` steps (``n_g``: the
group's size): round ``r`` is a shuffle, drawn from ``(seed, r)``, of a list holding group ``g`` ``ceil(n_g / B)``
times, so one round passes over every group about once, as the official VL-Adapter's multitask loader passes over
every task's loader once per epoch in a shuffled order. A step of group ``g`` takes the next B positions of
``g``'s stream (a group's last batch of a pass runs on into its next permutation: batches are always full and no
item is dropped).

**Ranks and micro-batches.** With ``W`` ranks and ``N = grad_accum_steps`` micro-batches, micro-batch ``m`` of a
step is the slice ``[m * B / N, (m + 1) * B / N)`` of the step's batch (in stream order), and rank ``r`` takes the
contiguous slice ``[r * B / (N W), (r + 1) * B / (N W))`` of each micro-batch. So the items of a step depend on the
seed and the step only: not on the world size, not on the accumulation, and not on whether the run was resumed
(the data position is the step).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np

__all__ = ["StepSampler", "check_batch_split"]

_GROUP_SALT = 0x67726F7570  # "group": keeps the group streams' seeds apart from the mixed stream's (seed, epoch)


def check_batch_split(batch_size: int, world: int, accum: int = 1) -> int:
    """Items per rank and micro-batch; the global batch must split evenly over ``accum`` micro-batches x ``world`` ranks."""
    parts = world * accum
    if batch_size % parts:
        how = f"the {world} ranks of this torchrun job" if accum == 1 else \
            f"{accum} micro-batches (trainer.grad_accum_steps) x {world} rank(s)"
        raise ValueError(f"trainer.batch_size: the global batch size {batch_size} does not divide by {how} "
                         f"(choose a multiple of {parts}, e.g. {max(parts, batch_size - batch_size % parts)})")
    return batch_size // parts


class StepSampler:
    """Indices of the training items of each step (see the module docstring).

    ``groups``: one hashable group id per training item (``task.batch_groups()``), or None for mixed batches."""

    def __init__(self, train_size: int, batch_size: int, seed: int, groups: Sequence[Hashable] | None = None):
        if train_size <= 0:
            raise ValueError(f"the training set is empty (train_size() is {train_size}): nothing to train on")
        if batch_size <= 0:
            raise ValueError(f"trainer.batch_size: expected an integer >= 1, got {batch_size}")
        self.train_size, self.batch_size, self.seed = train_size, batch_size, seed
        self._perms: dict[tuple, np.ndarray] = {}
        self.groups: list[np.ndarray] | None = None
        if groups is not None:
            groups = list(groups)
            if len(groups) != train_size:
                raise ValueError(f"task.batch_groups() gave {len(groups)} group ids for {train_size} training items "
                                 "(expected one per item)")
            members: dict[Hashable, list[int]] = {}
            for i, g in enumerate(groups):
                try:
                    members.setdefault(g, []).append(i)
                except TypeError:
                    raise ValueError(f"task.batch_groups()[{i}] is {g!r}, not a hashable group id") from None
            self.groups = [np.asarray(ix, dtype=np.int64) for ix in members.values()]  # first-appearance order
            self.group_names = list(members)
            self._per_round = np.asarray([math.ceil(len(ix) / batch_size) for ix in self.groups], dtype=np.int64)
            self._round_len = int(self._per_round.sum())
            self._round_base = np.repeat(np.arange(len(self.groups)), self._per_round)  # group g, ceil(n_g / B) times

    def _perm(self, key: tuple, n: int) -> np.ndarray:
        perm = self._perms.get(key)
        if perm is None:
            perm = np.random.default_rng(list(key)).permutation(n)
            if len(self._perms) >= 8:  # a step spans a few epochs of a few streams at most
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = perm
        return perm

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of ``range(train_size)`` used in mixed-batch ``epoch``, shape ``(train_size,)``."""
        return self._perm((self.seed, epoch), self.train_size)

    @staticmethod
    def _take(order, n: int, start: int, count: int) -> list[int]:
        """``count`` positions from ``start`` of the stream of permutations ``order(epoch)`` of ``n`` items."""
        out: list[int] = []
        pos, end = start, start + count
        while pos < end:
            epoch, offset = divmod(pos, n)
            take = min(end - pos, n - offset)
            out.extend(int(i) for i in order(epoch)[offset: offset + take])
            pos += take
        return out

    def _round(self, r: int) -> np.ndarray:
        """The group of each step of round ``r``, shape ``(R,)``."""
        return self._round_base[self._perm((self.seed, _GROUP_SALT, r), self._round_len)]

    def group_of(self, step: int) -> int:
        """The index (into ``group_names``) of the group that step ``step`` draws from (grouped streams only)."""
        r, offset = divmod(step, self._round_len)
        return int(self._round(r)[offset])

    def global_batch(self, step: int) -> list[int]:
        """The ``batch_size`` item indices of optimizer step ``step`` (0-based), in stream order."""
        if self.groups is None:
            return self._take(self.epoch_order, self.train_size, step * self.batch_size, self.batch_size)
        r, offset = divmod(step, self._round_len)
        round_groups = self._round(r)
        g = int(round_groups[offset])
        earlier = r * int(self._per_round[g]) + int(np.count_nonzero(round_groups[:offset] == g))  # steps of g before
        members = self.groups[g]
        local = self._take(lambda e: self._perm((self.seed, _GROUP_SALT, g, e), len(members)), len(members),
                           earlier * self.batch_size, self.batch_size)
        return [int(members[i]) for i in local]

    def micro_batches(self, step: int, rank: int, world: int, accum: int = 1) -> list[list[int]]:
        """Rank ``rank``'s contiguous share of each of the ``accum`` micro-batches of step ``step``."""
        per = check_batch_split(self.batch_size, world, accum)
        batch, size = self.global_batch(step), self.batch_size // accum
        return [batch[m * size + rank * per: m * size + (rank + 1) * per] for m in range(accum)]

    def rank_batch(self, step: int, rank: int, world: int) -> list[int]:
        """Rank ``rank``'s contiguous share of step ``step``'s global batch (no accumulation)."""
        return self.micro_batches(step, rank, world)[0]
