"""Frozen encoders' outputs computed once per clip and read back instead of running the encoders at every step
(`encoder_store` of `teacher.train`, `teacher.cache` and `distill.train`).

A store file is named by what its outputs depend on (`Salmonn.encoder_fingerprint`), not by who wrote it: a
student whose frozen encoder equals a teacher's (the same weights and output rules) reads the teacher's file, and
the teacher's Whisper pass can also write the outputs of its first-k-layer cuts (`speech_cuts`), which a student
built with `student.whisper_layer_selection: first` and k layers then reads instead of running its own."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.augment import AugmentConfig, AugmentedDataset, StoredCopies, augmentation_key
from common.feature_store import EncoderOutputDataset, build_encoder_store, encoder_store_path
from common.features import FeatureConfig
from common.model import move_batch
from teacher.salmonn import SPEECH_OUT, Salmonn, speech_cut_key


def refuse_augmented(augment: AugmentConfig, copies_supported: bool = False) -> None:
    """Stored encoder outputs are those of the unaugmented clips: stop a run that would augment them, unless it
    stores augmented copies (`data.augment.stored_copies`, where `copies_supported`)."""
    if not augment.active or (copies_supported and augment.stored_copies):
        return
    fix = "set data.augment.stored_copies: K (K augmented copies stored), " if copies_supported else ""
    raise SystemExit("config error: data.augment changes the encoders' inputs, but encoder_store reads cached "
                     f"encoder outputs of the unaugmented clips; {fix}set encoder_store: '' to augment at every "
                     "step, or turn data.augment off")


def with_stored_augmented_copies(model: Salmonn, augmented: AugmentedDataset, features: FeatureConfig,
                                 store_dir: str, name: str) -> StoredCopies:
    """The training split over the stored outputs of `model`'s frozen encoders for `stored_copies` augmented copies
    of every clip: copy c is augmented as epoch c draws it (`common.augment`), and epoch e reads copy e mod K. The
    items' other fields are the unaugmented split's (the encoders do not run). No Whisper cuts are stored for them:
    a student trains on the unaugmented clips."""
    key = augmentation_key(augmented)
    copies = []
    for c in range(augmented.cfg.stored_copies):
        augmented.set_epoch(c)
        copies.append(with_cached_encoders(model, augmented, features, store_dir, f"{name}-augment{key}-copy{c}",
                                           serve=augmented.dataset))
    return StoredCopies(copies)


def with_cached_encoders(model: Salmonn, dataset, features: FeatureConfig, store_dir: str, name: str,
                         speech_cuts: Sequence[int] = (), serve=None):
    """`dataset` whose items carry the outputs of `model`'s frozen encoders, each encoder's computed once into its
    own file under `store_dir` (so a change of BEATs does not recompute Whisper's). With `speech_cuts`, the pass
    that computes Whisper's outputs also stores, each in its own file, those of its first k layers for each k.
    `serve`: the view of the same split whose items the result carries, if not `dataset` (which the encoders read)."""
    keys = model.cacheable_encoders()
    if not keys:
        raise SystemExit("config error: encoder_store is set but no encoder's outputs can be cached: freeze an encoder "
                         "(model.whisper.freeze, model.beats.freeze); Whisper also needs whisper.per_clip: true or "
                         "whisper.pad_to_longest: false "
                         "and BEATs model.qformer.trim_to_audio: true (otherwise a clip's output depends on its batch)")
    if speech_cuts and SPEECH_OUT not in keys:
        raise SystemExit("config error: encoder_store_whisper_cuts needs the teacher's Whisper outputs stored "
                         "(model.whisper.freeze: true and whisper.per_clip: true); set encoder_store_whisper_cuts: []")
    depth = len(model.speech_encoder.layers)
    served = dataset if serve is None else serve
    model.eval()
    device = next(model.parameters()).device
    for key in keys:
        cuts = [k for k in speech_cuts if k != depth] if key == SPEECH_OUT else []
        path = encoder_store_path(dataset, model.encoder_fingerprint([key]), features, store_dir, f"{name}-{key}")
        files = {key: (path, key)}
        for k in cuts:
            cut_path = encoder_store_path(dataset, model.encoder_fingerprint([key], speech_layers=k), features,
                                          store_dir, f"{name}-{key}")
            files[speech_cut_key(k)] = (cut_path, key)
        missing = {out: target for out, target in files.items() if not target[0].is_file()}
        if missing:

            def encode(batch: dict, key: str = key, cuts: list[int] = cuts) -> dict[str, list[torch.Tensor]]:
                batch = move_batch(batch, device)
                outputs = model.encoder_outputs(batch, [key], speech_cuts=cuts)
                return {k: [t.cpu() for t in v] for k, v in outputs.items()}

            build_encoder_store(dataset, encode, missing)
        for k in cuts:
            print(f"{name}: stored the outputs of Whisper's first {k} layers in {files[speech_cut_key(k)][0]}")
        served = EncoderOutputDataset(served, path)
        print(f"{name}: cached {key} from {path}")
    return served
