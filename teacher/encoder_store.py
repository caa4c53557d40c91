"""Frozen encoders' outputs computed once per clip and read back instead of running the encoders at every step
(`encoder_store` of `teacher.train` and `teacher.cache`)."""

from __future__ import annotations

import torch

from common.feature_store import with_encoder_outputs
from common.features import FeatureConfig
from common.model import move_batch
from teacher.salmonn import Salmonn


def refuse_augmented(augment_active: bool) -> None:
    """Stored encoder outputs are those of the unaugmented clips: stop a run that would augment them."""
    if augment_active:
        raise SystemExit("config error: data.augment changes the encoders' inputs, but encoder_store reads cached "
                         "encoder outputs of the unaugmented clips; set encoder_store: '' to augment, or turn "
                         "data.augment off")


def with_cached_encoders(model: Salmonn, dataset, features: FeatureConfig, store_dir: str, name: str):
    """`dataset` whose items carry the outputs of `model`'s frozen encoders, each encoder's computed once into its
    own file under `store_dir` (so a change of BEATs does not recompute Whisper's)."""
    keys = model.cacheable_encoders()
    if not keys:
        raise SystemExit("config error: encoder_store is set but no encoder's outputs can be cached: freeze an encoder "
                         "(model.whisper.freeze, model.beats.freeze); Whisper also needs whisper.per_clip: true or "
                         "whisper.pad_to_longest: false "
                         "and BEATs model.qformer.trim_to_audio: true (otherwise a clip's output depends on its batch)")
    model.eval()
    device = next(model.parameters()).device
    for key in keys:

        def encode(batch: dict, key: str = key) -> dict[str, list[torch.Tensor]]:
            batch = move_batch(batch, device)
            return {k: [t.cpu() for t in v] for k, v in model.encoder_outputs(batch, [key]).items()}

        dataset = with_encoder_outputs(dataset, encode, model.encoder_fingerprint([key]), features, store_dir,
                                       f"{name}-{key}")
        print(f"{name}: cached {key} from {dataset.path}")
    return dataset
