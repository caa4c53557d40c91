"""teacher.beats against the official BEATs code's outputs (tests/fixtures/beats_tiny_deepnorm*.pt).

Tolerance against the official features, float32 on the CPU: 1e-5 absolute (largest difference seen
1.9e-6, on features up to 3.3 in magnitude). For scale: dropping the query gate of the relative position
bias moves the features by 1.6e-3, dropping the bias altogether by 3.9e-3, DeepNorm's residual scale by 0.39.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from common.fbank import beats_fbank
from teacher.beats import (
    BEATs,
    BEATsConfig,
    TokenState,
    downsample_padding_mask,
    relative_position_bucket,
)

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINT = FIXTURES / "beats_tiny_deepnorm.pt"
REFERENCE = FIXTURES / "beats_tiny_deepnorm_reference.pt"


@pytest.fixture(scope="module")
def official() -> BEATs:
    return BEATs.from_checkpoint(CHECKPOINT)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return torch.load(REFERENCE, weights_only=True)


def tiny_config(**overrides) -> BEATsConfig:
    """A small pre-LN config with every optional part switched on, and no dropout."""
    fields = dict(
        input_patch_size=16,
        embed_dim=24,
        encoder_layers=2,
        encoder_embed_dim=32,
        encoder_ffn_embed_dim=64,
        encoder_attention_heads=4,
        layer_norm_first=True,
        dropout=0.0,
        attention_dropout=0.0,
        conv_pos=5,
        conv_pos_groups=4,
        relative_position_embedding=True,
        num_buckets=32,
        max_distance=64,
        gru_rel_pos=True,
    )
    return BEATsConfig(**{**fields, **overrides})


POST_LN_VARIANT = dict(
    layer_norm_first=False,
    deep_norm=True,
    conv_pos=6,  # even kernel: the trimmed output step
    activation_fn="glu",
    encoder_layers=3,
)


def tiny_model(seed: int = 0, **overrides) -> BEATs:
    torch.manual_seed(seed)
    model = BEATs(tiny_config(**overrides)).eval()
    with torch.no_grad():  # grep_a starts at 1 everywhere; spread it so each head's gate differs
        for layer in model.encoder.layers:
            layer.self_attn.grep_a.uniform_(0.5, 1.5)
    return model


# --- the official checkpoint and its features ---------------------------------------------------------


def test_fixture_loads_strictly_with_one_shared_position_table(official):
    state = torch.load(CHECKPOINT, weights_only=True)["model"]
    assert set(official.state_dict()) == set(state)
    first, second = (layer.self_attn for layer in official.encoder.layers)
    assert second.relative_attention_bias is first.relative_attention_bias
    # The table is listed under both layers in the state dict but is one parameter of the model.
    table = state["encoder.layers.0.self_attn.relative_attention_bias.weight"].numel()
    assert sum(t.numel() for t in state.values()) - sum(p.numel() for p in official.parameters()) == table
    assert not official.training


def test_matches_official_features(official, reference):
    with torch.no_grad():
        features, feature_mask = official.extract_features(reference["wav"], reference["padding_mask"])
    assert features.shape == (2, 144, 48)
    assert torch.equal(feature_mask, reference["feature_mask"])
    # 5e-5: the fbank's float32 FFT rounds differently from CPU to CPU (test_fbank.py); seen: below 1e-5 on one,
    # 1.7e-5 on an AVX-512 one
    torch.testing.assert_close(features, reference["features"], atol=5e-5, rtol=0)


def test_forward_fbank_takes_precomputed_features(official, reference):
    fbank = beats_fbank(reference["wav"])
    frame_mask = downsample_padding_mask(reference["padding_mask"], fbank.shape[1])
    with torch.no_grad():
        features, feature_mask = official.forward_fbank(fbank, frame_mask)
    assert torch.equal(feature_mask, reference["feature_mask"])
    torch.testing.assert_close(features, reference["features"], atol=5e-5, rtol=0)  # as above


def test_half_precision_stays_close(official, reference):
    half = copy.deepcopy(official).half()
    with torch.no_grad():
        features, _ = half.extract_features(reference["wav"], reference["padding_mask"])
    assert features.dtype == torch.float16
    torch.testing.assert_close(features.float(), reference["features"], atol=2e-2, rtol=0)


# --- shapes, masks and positions -----------------------------------------------------------------------


def test_shapes_and_padding_mask_of_a_random_pre_ln_model():
    model = tiny_model()
    wav = 0.1 * torch.randn(2, 32000)
    padding_mask = torch.zeros(2, 32000, dtype=torch.bool)
    padding_mask[1, 16000:] = True
    with torch.no_grad():
        features, feature_mask = model.extract_features(wav, padding_mask)
        unmasked, no_mask = model.extract_features(wav)
    # 198 frames → 12 steps of 160 ms × 8 frequency patches.
    assert features.shape == unmasked.shape == (2, 96, 32)
    assert no_mask is None
    # Worked by hand the official way: 161 samples per frame, padded from frame 100 (161 · 100 ≥ 16000);
    # 2 frames per patch over the first 192 frames, padded from patch 50.
    assert not feature_mask[0].any()
    assert not feature_mask[1, :50].any() and feature_mask[1, 50:].all()
    assert torch.isfinite(features).all()
    torch.testing.assert_close(features[0], unmasked[0])


@pytest.mark.parametrize("variant", [{}, POST_LN_VARIANT], ids=["pre_ln", "post_ln_deep_norm"])
def test_padding_does_not_change_a_clips_features(variant):
    """Padded tokens are zeroed before the positional convolution and never attended to."""
    model = tiny_model(**variant)
    clip = torch.randn(1, 40, 32)
    padded = torch.cat([clip, 5 * torch.randn(1, 17, 32)], dim=1)
    padding_mask = torch.zeros(1, 57, dtype=torch.bool)
    padding_mask[:, 40:] = True
    with torch.no_grad():
        alone = model.encoder(clip).hidden
        in_batch = model.encoder(padded, padding_mask).hidden
    torch.testing.assert_close(in_batch[:, :40], alone, atol=1e-5, rtol=0)


def test_callback_runs_after_every_layer_and_identity_changes_nothing():
    model = tiny_model(encoder_layers=3)
    x = torch.randn(2, 24, 32)
    seen = []

    def record(index: int, state: TokenState) -> TokenState:
        seen.append((index, state.hidden.shape))
        return state

    with torch.no_grad():
        plain = model.encoder(x).hidden
        hooked = model.encoder(x, between_layers=record).hidden
    assert seen == [(i, (2, 24, 32)) for i in range(3)]
    torch.testing.assert_close(hooked, plain, atol=0, rtol=0)


@pytest.mark.parametrize("variant", [{}, POST_LN_VARIANT], ids=["pre_ln", "post_ln_deep_norm"])
def test_reordered_tokens_keep_their_relative_positions(variant):
    """Shuffling tokens mid-encoder with their original positions must only shuffle the output."""
    model = tiny_model(**variant)
    x = torch.randn(2, 30, 32)
    order = torch.stack([torch.randperm(30), torch.randperm(30)])  # a different order per clip

    def shuffle(index: int, state: TokenState) -> TokenState:
        if index != 0:
            return state
        hidden = state.hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, 32))
        return TokenState(hidden, None, state.positions.expand(2, -1).gather(1, order))

    with torch.no_grad():
        plain = model.encoder(x).hidden
        shuffled = model.encoder(x, between_layers=shuffle).hidden
    expected = plain.gather(1, order.unsqueeze(-1).expand(-1, -1, 32))
    torch.testing.assert_close(shuffled, expected, atol=1e-5, rtol=0)


def test_pruning_padding_tokens_mid_encoder_changes_no_real_token():
    """Dropping masked tokens after layer 0 (keeping original positions) is exact for the rest."""
    model = tiny_model(encoder_layers=3)
    x = torch.randn(1, 50, 32)
    padding_mask = torch.zeros(1, 50, dtype=torch.bool)
    padding_mask[:, 35:] = True

    def drop_padding(index: int, state: TokenState) -> TokenState:
        if index != 0:
            return state
        keep = ~state.padding_mask[0]
        return TokenState(state.hidden[:, keep], state.padding_mask[:, keep], state.positions[keep])

    with torch.no_grad():
        full = model.encoder(x, padding_mask).hidden
        pruned = model.encoder(x, padding_mask, between_layers=drop_padding)
    assert pruned.hidden.shape == (1, 35, 32)
    assert torch.equal(pruned.positions, torch.arange(35))
    torch.testing.assert_close(pruned.hidden, full[:, :35], atol=1e-5, rtol=0)


def test_relative_position_bucket_against_the_formula():
    num_buckets, max_distance = 320, 800  # per direction: 160 buckets, 80 exact, log-spaced to 800
    relative = torch.arange(-1000, 1001)
    buckets = dict(
        zip(
            relative.tolist(),
            relative_position_bucket(relative, num_buckets, max_distance).tolist(),
            strict=True,
        )
    )
    for distance in range(80):
        assert buckets[-distance] == distance  # key before the query
        assert buckets[distance] == (160 + distance if distance else 0)  # key after the query
    for distance in (100, 200, 400, 799):  # none sits on a bucket boundary
        far = 80 + int(math.log(distance / 80) / math.log(max_distance / 80) * 80)
        assert buckets[-distance] == far and buckets[distance] == 160 + far
    assert {buckets[d] for d in range(800, 1001)} == {319}
    assert {buckets[-d] for d in range(800, 1001)} == {159}


def test_downsample_padding_mask_the_official_way():
    # 12 entries → the last 2 dropped, 5 runs of 2; the run (False, True) is not all padding.
    mask = torch.tensor([[False] * 7 + [True] * 5])
    assert downsample_padding_mask(mask, 5).tolist() == [[False, False, False, False, True]]


# --- training-time behaviour ---------------------------------------------------------------------------


def test_layer_wise_gradient_decay_scales_input_gradients_per_layer():
    x = torch.randn(1, 20, 32)
    grads = []
    for ratio in (1.0, 0.5):
        model = tiny_model(layer_wise_gradient_decay_ratio=ratio).train()
        inputs = x.clone().requires_grad_()
        model.encoder(inputs).hidden.square().sum().backward()
        grads.append(inputs.grad)
    torch.testing.assert_close(grads[1], 0.25 * grads[0])  # two layers, 0.5 each


def test_layerdrop_of_one_skips_every_layer_in_training_only():
    model = tiny_model(encoder_layerdrop=1.0).train()
    x = torch.randn(1, 20, 32)
    with torch.no_grad():
        no_layers = model.encoder.layer_norm(model.encoder.add_positions(x))
        torch.testing.assert_close(model.encoder(x).hidden, no_layers)
        assert not torch.allclose(model.eval().encoder(x).hidden, no_layers)


# --- configs, checkpoints and the tagging head ---------------------------------------------------------


def test_config_defaults_are_the_official_ones():
    official_defaults = dict(
        input_patch_size=-1,
        embed_dim=512,
        conv_bias=False,
        encoder_layers=12,
        encoder_embed_dim=768,
        encoder_ffn_embed_dim=3072,
        encoder_attention_heads=12,
        activation_fn="gelu",
        layer_wise_gradient_decay_ratio=1.0,
        layer_norm_first=False,
        deep_norm=False,
        dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
        dropout_input=0.0,
        conv_pos=128,
        conv_pos_groups=16,
        relative_position_embedding=False,
        num_buckets=320,
        max_distance=1280,
        gru_rel_pos=False,
        finetuned_model=False,
        predictor_dropout=0.1,
        predictor_class=527,
    )
    assert BEATsConfig().to_dict() == official_defaults


def test_unknown_config_key_is_named(tmp_path):
    with pytest.raises(ValueError, match="encoder_depth"):
        BEATsConfig.from_dict({"encoder_layers": 2, "encoder_depth": 2})
    model = tiny_model()
    checkpoint = model.to_checkpoint()
    checkpoint["cfg"]["use_cls_token"] = True
    torch.save(checkpoint, tmp_path / "extra_key.pt")
    with pytest.raises(ValueError, match="use_cls_token"):
        BEATs.from_checkpoint(tmp_path / "extra_key.pt")


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="input_patch_size"):
        BEATs(BEATsConfig(encoder_layers=1))
    with pytest.raises(ValueError, match="deep_norm"):
        BEATs(tiny_config(deep_norm=True))
    with pytest.raises(ValueError, match="activation_fn"):
        BEATs(tiny_config(activation_fn="swish"))


@pytest.mark.parametrize("variant", [{}, POST_LN_VARIANT], ids=["pre_ln", "post_ln_deep_norm"])
def test_checkpoint_round_trip(tmp_path, variant):
    model = tiny_model(**variant)
    torch.save(model.to_checkpoint(), tmp_path / "beats.pt")
    loaded = BEATs.from_checkpoint(tmp_path / "beats.pt")
    assert loaded.cfg == model.cfg
    assert loaded.state_dict().keys() == model.state_dict().keys()
    wav = 0.1 * torch.randn(1, 8000)
    with torch.no_grad():
        expected, _ = model.extract_features(wav)
        torch.testing.assert_close(loaded.extract_features(wav)[0], expected, atol=0, rtol=0)


def test_mismatched_checkpoint_names_the_file_and_keys(tmp_path):
    checkpoint = tiny_model().to_checkpoint()
    del checkpoint["model"]["encoder.layers.1.fc2.bias"]
    checkpoint["model"]["encoder.layers.1.fc3.bias"] = torch.zeros(32)
    path = tmp_path / "broken.pt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="broken.pt") as error:
        BEATs.from_checkpoint(path)
    assert "encoder.layers.1.fc2.bias" in str(error.value) and "encoder.layers.1.fc3.bias" in str(error.value)


def test_disagreeing_copies_of_the_shared_table_are_refused(tmp_path):
    checkpoint = tiny_model().to_checkpoint()
    key = "encoder.layers.1.self_attn.relative_attention_bias.weight"
    checkpoint["model"][key] = checkpoint["model"][key] + 1.0
    torch.save(checkpoint, tmp_path / "split_table.pt")
    with pytest.raises(ValueError, match=key):
        BEATs.from_checkpoint(tmp_path / "split_table.pt")


def test_predictor_averages_token_logits_over_real_tokens():
    model = tiny_model(finetuned_model=True, predictor_class=5)
    assert "predictor.weight" in model.state_dict()
    features = torch.randn(2, 16, 32)
    padding_mask = torch.zeros(2, 16, dtype=torch.bool)
    padding_mask[1, 10:] = True
    with torch.no_grad():
        probs = model.predict(features, padding_mask)
        logits = model.predictor(features)
    expected = torch.stack([logits[0].mean(0), logits[1, :10].mean(0)]).sigmoid()
    assert probs.shape == (2, 5)
    torch.testing.assert_close(probs, expected)
    with pytest.raises(RuntimeError, match="predictor"):
        tiny_model().predict(features)


def test_config_is_a_plain_dataclass_round_trip():
    cfg = tiny_config(finetuned_model=True)
    assert BEATsConfig.from_dict(dataclasses.asdict(cfg)) == cfg
