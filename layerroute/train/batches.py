"""What each optimizer step reads: the deterministic micro-batch order (`BatchOrder`), target counts for the loss
denominators, and the fixed validation subset."""

from __future__ import annotations

from ..nn.losses import IGNORE_INDEX


class BatchOrder:
    """Global micro-batch number g -> indices of training steps.

    Epoch e is `length_grouped_batches(steps, batch_size, seed=f(seed, e))`; micro-batch g is batch g mod n of epoch
    g div n. An optimizer step s on process r of W with A accumulation steps reads batches (s*A + k)*W + r, so the
    data position is a function of the step alone (and is saved with checkpoints as a check)."""

    def __init__(self, steps: list, batch_size: int, seed: int):
        from ..data.collate import length_grouped_batches

        self._group = length_grouped_batches
        self.steps, self.batch_size, self.seed = steps, batch_size, seed
        self._epoch, self._order = -1, []
        self.batches_per_epoch = len(self._order_of(0))

    def _order_of(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            self._order = self._group(self.steps, self.batch_size, seed=self.seed * 100_003 + epoch)
            self._epoch = epoch
        return self._order

    def batch(self, g: int) -> list[int]:
        epoch, i = divmod(g, self.batches_per_epoch)
        return self._order_of(epoch)[i]

    def position(self, g: int) -> dict:
        epoch, i = divmod(g, self.batches_per_epoch)
        return {"next_batch": g, "epoch": epoch, "batch_in_epoch": i, "batches_per_epoch": self.batches_per_epoch}


def target_count(step) -> int:
    """Number of next-token targets of a step (labels set at positions 1..T-1)."""
    return sum(1 for x in step.labels[1:] if x != IGNORE_INDEX)


def eval_subset(steps: list, n: int) -> list:
    """The first n eval steps, half tool calls and half planning when both are there (stable order)."""
    tool = [s for s in steps if s.step_type == "tool_call"]
    plan = [s for s in steps if s.step_type != "tool_call"]
    n_tool = min(len(tool), max(n - len(plan), (n + 1) // 2))
    return tool[:n_tool] + plan[: n - n_tool]
