"""The feature store returns exactly the features the dataset computes (up to float16), and rebuilds on change."""

import json

import numpy as np
import soundfile as sf
import torch

from common.dataset import AudioTextCollator, AudioTextDataset, DataConfig
from common.feature_store import with_feature_store
from common.features import FeatureConfig


def test_store_matches_direct_features_and_rebuilds(tmp_path):
    rng = np.random.default_rng(0)
    entries = []
    for i, seconds in enumerate([0.5, 1.3, 0.8]):
        sf.write(tmp_path / f"{i}.wav", (0.2 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
        entries.append({"path": f"{i}.wav", "text": f"clip {i}", "task": "asr"})
    entries.append({"path": "1.wav", "text": "another caption of clip 1", "task": "audiocaption"})
    (tmp_path / "a.json").write_text(json.dumps({"annotation": entries}))
    feat = FeatureConfig(whisper_chunk_seconds=2)
    ds = AudioTextDataset.scan([str(tmp_path / "a.json")], DataConfig(), feat)
    stored = with_feature_store(ds, feat, tmp_path / "store", "test", workers=1)
    from safetensors import safe_open

    with safe_open(str(stored.path), framework="pt") as f:
        assert f.get_slice("mel").get_shape()[0] == 3  # the clip with two targets is stored once
    for i in range(4):
        direct, cached = ds[i], stored[i]
        assert cached["fbank"].shape == direct["fbank"].shape and cached["mel"].shape == direct["mel"].shape
        torch.testing.assert_close(cached["mel"], direct["mel"], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(cached["fbank"], direct["fbank"], atol=5e-3, rtol=2e-3)
        assert cached["text"] == direct["text"] and cached["prompt"] == direct["prompt"]
    batch = AudioTextCollator()([stored[0], stored[1]])
    assert batch["fbank"].shape[:2] == (2, stored[1]["fbank"].shape[0])
    assert len(list((tmp_path / "store").glob("*.safetensors"))) == 1
    with_feature_store(ds, FeatureConfig(whisper_chunk_seconds=3), tmp_path / "store", "test", workers=1)
    assert len(list((tmp_path / "store").glob("*.safetensors"))) == 2
