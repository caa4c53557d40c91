"""A split as a training job reads it: scanned and cleaned (`common.dataset.scan_split`), read from the feature store
when one is set, and the train split augmented as `data.augment` says."""

from __future__ import annotations

from pathlib import Path

from common.augment import with_augmentation
from common.dataset import DataConfig, scan_split
from common.feature_store import with_feature_store
from common.features import FeatureConfig


def load_split(data: DataConfig, features: FeatureConfig, split: str, output_dir: str | Path, feature_store: str = "",
               seed: int = 0):
    """The split scanned (and cleaned), from `feature_store` when one is set; the train split augmented (seeded by
    `seed`, the loop's). Its data report goes to `<output_dir>/data_report_<split>.json`."""
    dataset = scan_split(data, features, split, output_dir)
    if feature_store:
        dataset = with_feature_store(dataset, features, feature_store, split)
    if split == "train":
        dataset = with_augmentation(dataset, data.augment, seed)
        dataset.report.save(Path(output_dir) / f"data_report_{split}.json")  # with the augmentation's settings
    return dataset
