"""The training data stream: which items each optimizer step sees, on each rank.

The stream is a concatenation of permutations of ``range(train_size)``, epoch ``e``'s permutation drawn
from ``(seed, e)`` alone; step ``s`` takes stream positions ``[s * B, (s + 1) * B)`` (B: the GLOBAL batch
size), and rank ``r`` of ``W`` takes the contiguous slice ``[r * B / W, (r + 1) * B / W)`` of that batch.
So the items of a step depend on the seed and the step only: not on the world size, and not on whether
the run was resumed (the data position is the step).
"""

from __future__ import annotations

import numpy as np

__all__ = ["StepSampler", "check_batch_split"]


def check_batch_split(batch_size: int, world: int) -> int:
    """Items per rank; the global batch must split evenly over the ranks."""
    if batch_size % world:
        raise ValueError(f"trainer.batch_size: the global batch size {batch_size} does not divide by the {world} ranks "
                         f"of this torchrun job (choose a multiple of {world}, e.g. {max(world, batch_size - batch_size % world)})")
    return batch_size // world


class StepSampler:
    """Indices of the training items of each step (see the module docstring)."""

    def __init__(self, train_size: int, batch_size: int, seed: int):
        if train_size <= 0:
            raise ValueError(f"the training set is empty (train_size() is {train_size}): nothing to train on")
        if batch_size <= 0:
            raise ValueError(f"trainer.batch_size: expected an integer >= 1, got {batch_size}")
        self.train_size, self.batch_size, self.seed = train_size, batch_size, seed
        self._perms: dict[int, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of ``range(train_size)`` used in ``epoch``, shape ``(train_size,)``."""
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.train_size)
            if len(self._perms) >= 2:  # a step spans at most the few epochs around it
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def global_batch(self, step: int) -> list[int]:
        """The ``batch_size`` item indices of optimizer step ``step`` (0-based), in stream order."""
        out: list[int] = []
        pos, end = step * self.batch_size, (step + 1) * self.batch_size
        while pos < end:
            epoch, offset = divmod(pos, self.train_size)
            take = min(end - pos, self.train_size - offset)
            out.extend(int(i) for i in self.epoch_order(epoch)[offset: offset + take])
            pos += take
        return out

    def rank_batch(self, step: int, rank: int, world: int) -> list[int]:
        """Rank ``rank``'s contiguous share of step ``step``'s global batch."""
        per_rank = check_batch_split(self.batch_size, world)
        return self.global_batch(step)[rank * per_rank: (rank + 1) * per_rank]
