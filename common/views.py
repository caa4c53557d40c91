"""A dataset that wraps another and passes its bookkeeping through: the base of the feature-store views, the subset
view and the augmented training split."""

from __future__ import annotations

from torch.utils.data import Dataset


class DatasetView(Dataset):
    """A wrapper that passes the wrapped dataset's `examples`, `durations`, `report`, `prompt` and length through;
    subclasses set `self.dataset` and change what an item holds."""

    dataset: Dataset

    @property
    def examples(self):
        return self.dataset.examples

    @property
    def durations(self):
        return self.dataset.durations

    @property
    def report(self):
        return self.dataset.report

    def prompt(self, ex) -> str:
        return self.dataset.prompt(ex)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to an augmented dataset underneath (`common.augment`)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
