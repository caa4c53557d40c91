"""student.token_pruning: BEATs token pruning with original positions, restored outputs and analytic FLOPs.

References are independent of the code under test: the plain `teacher.beats.BEATs` (keep ratio 1, and a hand-made
pruning callback that drops the same tokens), hand-computed merges and FLOP counts written out below.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from common.fbank import beats_fbank
from student.token_pruning import (
    PrunedBEATs,
    TokenPruningConfig,
    beats_cost,
    fbank_frames,
    fuse_tokens,
    keep_counts,
    layer_token_counts,
    patch_tokens,
    select_tokens,
    tome_merge,
)
from student.token_pruning_bench import bench, main
from teacher.beats import BEATs, BEATsConfig, TokenState

torch.set_num_threads(1)

FRAMES = 96
"""6 patch steps of 160 ms × 8 frequency patches = 48 tokens."""
TOKENS = 48


def tiny_config(**overrides) -> BEATsConfig:
    """Post-LN DeepNorm BEATs with the gated relative position bias, as SALMONN's BEATs; no dropout."""
    fields = dict(
        input_patch_size=16,
        embed_dim=24,
        encoder_layers=3,
        encoder_embed_dim=32,
        encoder_ffn_embed_dim=64,
        encoder_attention_heads=4,
        deep_norm=True,
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


@pytest.fixture(scope="module")
def beats() -> BEATs:
    torch.manual_seed(0)
    model = BEATs(tiny_config()).eval()
    with torch.no_grad():  # grep_a starts at 1 everywhere; spread it so each head's gate differs
        for layer in model.encoder.layers:
            layer.self_attn.grep_a.uniform_(0.5, 1.5)
        # Post-LN layers end in a LayerNorm: at its initial unit gain every token's norm is nearly sqrt(dim) and
        # the norm score would rank float noise. Trained gains and biases, as in a real checkpoint, separate them.
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def fbank() -> torch.Tensor:
    return torch.randn(2, FRAMES, 128, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def half_padded() -> torch.Tensor:
    """Fbank padding mask: the second clip is real for its first 48 frames (24 of 48 patch tokens)."""
    mask = torch.zeros(2, FRAMES, dtype=torch.bool)
    mask[1, 48:] = True
    return mask


def pruned(beats: BEATs, **fields) -> PrunedBEATs:
    return PrunedBEATs.from_beats(beats, TokenPruningConfig(**fields))


# --- keep ratio 1 and the checkpoint -------------------------------------------------------------------------


def test_keep_ratio_one_is_exactly_plain_beats(beats, fbank, half_padded):
    model = pruned(beats, keep_ratio=1.0, prune_after_layers=[0])
    with torch.no_grad():
        features, mask = model.forward_fbank(fbank, half_padded)
        expected, expected_mask = beats.forward_fbank(fbank, half_padded)
        wav = torch.randn(2, 16000, generator=torch.Generator().manual_seed(2))
        wav_features = model.extract_features(wav)[0]
        expected_wav = beats.extract_features(wav)[0]
    assert torch.equal(features, expected) and torch.equal(mask, expected_mask)
    assert torch.equal(wav_features, expected_wav)


def test_checkpoint_is_an_official_beats_checkpoint(beats, fbank, tmp_path):
    model = pruned(beats, keep_ratio=0.5, prune_after_layers=[0, 1], merge="tome")
    checkpoint = model.to_checkpoint()
    assert set(checkpoint) == {"cfg", "model"}
    assert list(checkpoint["model"]) == list(beats.state_dict())  # pruning adds no parameters
    torch.save(checkpoint, tmp_path / "beats.pt")
    loaded = BEATs.from_checkpoint(tmp_path / "beats.pt")  # strict: raises on any missing or extra key
    reloaded = PrunedBEATs.from_beats(loaded, model.pruning_config)
    with torch.no_grad():
        assert torch.equal(loaded.forward_fbank(fbank)[0], beats.forward_fbank(fbank)[0])
        assert torch.equal(reloaded.forward_fbank(fbank)[0], model.forward_fbank(fbank)[0])


def test_invalid_configs_are_refused(beats):
    for fields in (
        dict(keep_ratio=0.0, prune_after_layers=[0]),
        dict(keep_ratio=1.5),
        dict(keep_ratio=0.5),  # no layer to prune after
        dict(keep_ratio=0.5, prune_after_layers=[0, 0]),
        dict(score="random"),
        dict(merge="average"),
        dict(segment_seconds=-1.0),
    ):
        with pytest.raises(ValueError):
            TokenPruningConfig(**fields)
    with pytest.raises(ValueError, match="last layer"):
        pruned(beats, keep_ratio=0.5, prune_after_layers=[2])


# --- the attention hook --------------------------------------------------------------------------------------


def test_received_attention_is_recorded_only_when_asked(beats, fbank, half_padded):
    attention = beats.encoder.layers[1].self_attn
    with torch.no_grad():
        plain = beats.forward_fbank(fbank, half_padded)[0]
        assert attention.received_attention is None
        attention.record_received_attention = True
        try:
            recorded = beats.forward_fbank(fbank, half_padded)[0]
            received = attention.received_attention
        finally:
            attention.record_received_attention, attention.received_attention = False, None
    assert torch.equal(recorded, plain)
    assert received.shape == (2, TOKENS) and received.dtype == torch.float32
    # Every real query spreads probability 1 over the keys, so the averages sum to 1; padding keys get none.
    torch.testing.assert_close(received.sum(dim=1), torch.ones(2))
    assert torch.all(received[1, 24:] == 0) and torch.all(received[:, :24] > 0)


# --- schedule, shapes, positions ------------------------------------------------------------------------------


def test_keep_ratio_is_split_geometrically_across_layers():
    two_steps = TokenPruningConfig(keep_ratio=0.25, prune_after_layers=[3, 1])
    assert keep_counts(100, two_steps) == {1: 50, 3: 25}  # 100 · 0.25^(1/2), 100 · 0.25
    assert keep_counts(10, TokenPruningConfig(keep_ratio=0.7, prune_after_layers=[0])) == {0: 7}  # not 8
    assert keep_counts(10, TokenPruningConfig(keep_ratio=0.01, prune_after_layers=[0])) == {0: 1}
    assert layer_token_counts(100, two_steps, 5) == [100, 100, 51, 51, 26]  # + the fused token
    assert layer_token_counts(100, dataclasses.replace(two_steps, merge="drop"), 5) == [100, 100, 50, 50, 25]


@pytest.mark.parametrize("merge", ["fuse", "tome", "drop"])
@pytest.mark.parametrize("score", ["attention", "norm"])
def test_tokens_per_layer_and_output_restored_to_original_length(beats, fbank, half_padded, merge, score):
    model = pruned(beats, keep_ratio=0.25, prune_after_layers=[0, 1], merge=merge, score=score)
    with torch.no_grad():
        encoding = model.encode_pruned(fbank, half_padded)
        features, mask = model.forward_fbank(fbank, half_padded)
    extra = int(merge == "fuse")
    assert encoding.tokens_per_layer == [48, 24 + extra, 12 + extra]  # 48 · 0.5, 48 · 0.25
    assert encoding.state.hidden.shape == (2, 12 + extra, 32)
    assert encoding.state.positions.shape == (2, 12 + extra)
    assert features.shape == (2, TOKENS, 32)
    assert torch.equal(mask, beats.forward_fbank(fbank, half_padded)[1])
    assert torch.isfinite(features).all()


def test_kept_tokens_keep_their_original_positions(beats, fbank):
    """Against a hand-made callback that drops the same tokens from the plain model."""
    model = pruned(beats, keep_ratio=0.5, prune_after_layers=[0], score="norm", merge="drop")
    with torch.no_grad():
        encoding = model.encode_pruned(fbank)
        patches, _ = beats.embed_patches(fbank)

        def drop_by_hand(use_original_positions: bool):
            def callback(layer: int, state: TokenState) -> TokenState:
                if layer != 0:
                    return state
                kept = state.hidden.norm(dim=-1).topk(24, dim=1).indices.sort(dim=1).values
                hidden = state.hidden.gather(1, kept.unsqueeze(-1).expand(-1, -1, 32))
                positions = kept if use_original_positions else torch.arange(24).expand(2, -1)
                return TokenState(hidden, None, positions)

            return beats.encoder(patches, None, callback)

        by_hand = drop_by_hand(use_original_positions=True)
        renumbered = drop_by_hand(use_original_positions=False)
    assert torch.equal(encoding.state.positions, by_hand.positions)
    torch.testing.assert_close(encoding.state.hidden, by_hand.hidden, rtol=0, atol=1e-6)
    # The check has teeth: renumbering the kept tokens 0..23 changes the relative bias, hence the output.
    assert (encoding.state.hidden - renumbered.hidden).abs().max() > 1e-3


@pytest.mark.parametrize("merge", ["fuse", "tome", "drop"])
def test_outputs_return_to_their_original_positions(beats, fbank, merge):
    model = pruned(beats, keep_ratio=0.5, prune_after_layers=[0], merge=merge)
    with torch.no_grad():
        encoding = model.encode_pruned(fbank)
    restored, hidden = encoding.restored(), encoding.state.hidden
    kept_positions = encoding.state.positions[:, :24]
    for b in range(2):
        assert torch.equal(restored[b, kept_positions[b]], hidden[b, :24])  # each kept token at its own index
        is_pruned = torch.ones(TOKENS, dtype=torch.bool)
        is_pruned[kept_positions[b]] = False
        pruned_outputs = restored[b, is_pruned]
        if merge == "drop":
            assert torch.all(pruned_outputs == 0)
        elif merge == "fuse":  # every pruned patch holds the fused token's output
            assert torch.equal(pruned_outputs, hidden[b, 24].expand(24, -1))
        else:  # each holds the output of a kept token it merged into
            matches = (pruned_outputs[:, None, :] == hidden[b, None, :24, :]).all(dim=-1)
            assert torch.all(matches.sum(dim=1) == 1)


# --- segments and padding ------------------------------------------------------------------------------------


def test_select_tokens_by_score_and_per_segment_share():
    scores = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3, 2]])  # the late tokens always lose a global top-k
    real = torch.ones(1, 8, dtype=torch.bool)
    everywhere = torch.zeros(1, 8, dtype=torch.long)
    halves = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    uneven = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1]])
    kept, dropped = select_tokens(scores, everywhere, real, 4)
    assert kept.tolist() == [[0, 1, 2, 3]] and sorted(dropped[0].tolist()) == [4, 5, 6, 7]
    assert select_tokens(scores, halves, real, 4)[0].tolist() == [[0, 1, 4, 5]]
    # Priority = rank in segment / segment size: 0 (tokens 0, 6), 1/6, 2/6, then 3/6 for token 3 and token 7,
    # where the higher score wins.
    assert select_tokens(scores, uneven, real, 4)[0].tolist() == [[0, 1, 2, 6]]
    assert select_tokens(scores, uneven, real, 5)[0].tolist() == [[0, 1, 2, 3, 6]]


def test_padding_is_never_kept_over_real_tokens():
    scores = torch.tensor([[1.0, 2.0, 3.0, 100.0, 100.0]])  # padding that would win on score
    real = torch.tensor([[True, True, True, False, False]])
    segments = torch.zeros(1, 5, dtype=torch.long)
    assert select_tokens(scores, segments, real, 2)[0].tolist() == [[1, 2]]
    assert select_tokens(scores, segments, real, 4)[0].tolist() == [[0, 1, 2, 3]]  # too few real: pads last


@pytest.mark.parametrize("merge", ["fuse", "tome", "drop"])
def test_padded_clip_keeps_real_tokens_first(beats, fbank, half_padded, merge):
    few = pruned(beats, keep_ratio=0.25, prune_after_layers=[0], merge=merge)  # 12 of 24 real tokens
    many = pruned(beats, keep_ratio=0.75, prune_after_layers=[0], merge=merge)  # 36: all 24 real + 12 padding
    with torch.no_grad():
        state_few = few.encode_pruned(fbank, half_padded).state
        state_many = many.encode_pruned(fbank, half_padded).state
    assert torch.all(state_few.positions[1, :12] < 24) and not state_few.padding_mask[:, :12].any()
    assert state_many.positions[1, :24].tolist() == list(range(24))
    assert state_many.padding_mask[1, 24:36].all() and not state_many.padding_mask[0].any()
    if merge == "fuse":  # only padding was pruned from the second clip: its fused token holds nothing
        assert state_many.padding_mask[:, -1].tolist() == [False, True]


def test_every_time_segment_keeps_its_share(beats, fbank):
    # 0.32 s = 2 patch steps = 16 tokens: three segments; half of each survives whatever the scores say.
    for score in ("attention", "norm"):
        model = pruned(beats, keep_ratio=0.5, prune_after_layers=[0], score=score, segment_seconds=0.32, merge="drop")
        with torch.no_grad():
            positions = model.encode_pruned(fbank).state.positions
        for b in range(2):
            assert torch.bincount(positions[b] // 16, minlength=3).tolist() == [8, 8, 8]
    # A keep ratio of 1/16 keeps 3 tokens: one per segment.
    model = pruned(beats, keep_ratio=1 / 16, prune_after_layers=[0], segment_seconds=0.32, merge="drop")
    with torch.no_grad():
        positions = model.encode_pruned(fbank).state.positions
    assert (positions // 16).tolist() == [[0, 1, 2], [0, 1, 2]]


# --- merges ----------------------------------------------------------------------------------------------------


def test_fuse_adds_exactly_one_token_for_the_whole_encoder(beats, fbank):
    model = pruned(beats, keep_ratio=0.25, prune_after_layers=[0, 1], merge="fuse", score="norm")
    with torch.no_grad():
        encoding = model.encode_pruned(fbank)
    assert encoding.tokens_per_layer == [48, 25, 13]
    # The fused token (last) holds the 36 pruned patches; its position is their mean original position.
    held = encoding.owner == 12
    assert held.sum(dim=1).tolist() == [36, 36]
    for b in range(2):
        mean_position = torch.arange(TOKENS)[held[b]].float().mean().round().long()
        assert encoding.state.positions[b, 12] == mean_position
        assert set(encoding.state.positions[b, :12].tolist()).isdisjoint(torch.nonzero(held[b]).flatten().tolist())


def test_fuse_is_a_weighted_mean_of_the_pruned_tokens():
    pruned_tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    fused = fuse_tokens(pruned_tokens, torch.tensor([[3.0, 1.0, 0.0]]))  # the last is padding: weight 0
    torch.testing.assert_close(fused, torch.tensor([[0.75, 0.25]]))


def test_tome_merges_by_cosine_similarity_and_preserves_mass():
    kept = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.01]]])
    kept_sizes = torch.tensor([[1.0, 2.0, 0.0]])  # the third is padding: nothing may merge into it
    pruned_tokens = torch.tensor([[[2.0, 0.1], [0.0, 3.0], [7.0, 7.0]]])
    pruned_sizes = torch.tensor([[1.0, 1.0, 0.0]])  # the third is padding: adds nothing
    merged, sizes, target = tome_merge(kept, kept_sizes, pruned_tokens, pruned_sizes)
    assert target[0, :2].tolist() == [0, 1]
    # (1·[1, 0] + 1·[2, 0.1]) / 2 and (2·[0, 1] + 1·[0, 3]) / 3; the padding token unchanged.
    torch.testing.assert_close(merged, torch.tensor([[[1.5, 0.05], [0.0, 5 / 3], [1.0, 0.01]]]))
    torch.testing.assert_close(sizes, torch.tensor([[2.0, 3.0, 0.0]]))
    mass_before = (kept * kept_sizes[..., None]).sum(1) + (pruned_tokens * pruned_sizes[..., None]).sum(1)
    torch.testing.assert_close((merged * sizes[..., None]).sum(1), mass_before)


def test_gradients_flow_through_every_merge(beats, fbank, half_padded):
    for merge in ("fuse", "tome", "drop"):
        model = pruned(beats, keep_ratio=0.25, prune_after_layers=[0, 1], merge=merge).train()
        features, _ = model.forward_fbank(fbank, half_padded)
        features.square().mean().backward()
        gradient = model.patch_embedding.weight.grad
        assert gradient is not None and torch.isfinite(gradient).all() and gradient.abs().sum() > 0


# --- cost ------------------------------------------------------------------------------------------------------


def test_clip_length_to_tokens_matches_the_fbank():
    assert fbank_frames(1.0) == beats_fbank(torch.zeros(1, 16000)).shape[1] == 98
    assert patch_tokens(tiny_config(), 10.0) == 496  # 998 frames → 62 steps of 160 ms × 8


def test_flops_formula_on_a_hand_computed_config():
    cfg = tiny_config(embed_dim=8, encoder_embed_dim=16, encoder_ffn_embed_dim=32, encoder_attention_heads=2,
                      conv_pos=4, conv_pos_groups=2)
    pruning = TokenPruningConfig(keep_ratio=0.5, prune_after_layers=[0], merge="fuse")
    cost = beats_cost(cfg, pruning, 1.0)  # 98 frames → 6 steps × 8 = 48 tokens; layers see 48, 24 + 1, 25
    assert cost["tokens"] == 48 and cost["tokens_per_layer"] == [48, 25, 25]
    embedding = 48 * 8 * 16 * 16 + 48 * 8 * 16  # patch convolution + post_extract_proj, multiply-adds
    positional = 48 * 16 * (16 // 2) * 4  # grouped convolution, kernel 4

    def layer(t: int) -> int:
        return 4 * t * 16 * 16 + 2 * t * t * 16 + 2 * t * 16 * 32  # projections, q·kᵀ and p·v, fc1 + fc2

    assert layer(48) == 172_032 and layer(25) == 71_200
    assert cost["patch_embedding"] == 2 * embedding == 208_896
    assert cost["positional_conv"] == 2 * positional == 49_152
    assert cost["layers"] == [2 * 172_032, 2 * 71_200, 2 * 71_200]
    assert cost["total"] == 2 * (98_304 + 6_144 + 24_576 + 172_032 + 2 * 71_200) == 886_912
    glu = beats_cost(dataclasses.replace(cfg, activation_fn="glu"), TokenPruningConfig(), 1.0)
    assert glu["layers"][0] == 2 * (4 * 48 * 256 + 2 * 48 * 48 * 16 + 48 * 16 * (64 + 32))


def test_bench_and_cli_print_a_row_per_ratio(beats, capsys):
    rows = bench(beats, ratios=[1.0, 0.5], seconds=1.0, runs=1, warmup=0,
                 pruning=TokenPruningConfig(prune_after_layers=[0]))
    assert [row["keep_ratio"] for row in rows] == [1.0, 0.5]
    assert [row["tokens"] for row in rows] == [48, 25]
    assert rows[0]["flops_ratio"] == 1.0 and rows[1]["flops_ratio"] < 1.0
    assert all(row["latency_ms"] > 0 for row in rows)
    rows = main(["--config", '{"input_patch_size": 16, "embed_dim": 16, "encoder_layers": 2, "encoder_embed_dim": '
                 '32, "encoder_attention_heads": 2, "conv_pos": 4, "conv_pos_groups": 2}',
                 "--ratios", "1.0", "0.25", "--seconds", "1", "--runs", "1", "--warmup", "0", "--merge", "tome"])
    assert [row["tokens"] for row in rows] == [48, 12]
    printed = capsys.readouterr().out
    assert "keep_ratio" in printed and "merge=tome" in printed and printed.count("\n") == 2 * 4
