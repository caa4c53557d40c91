"""The toy teacher's training aids: the Q-Former CTC term (transcript tokens over the Q-Former windows), the
audio-token aligner, and the encoder CTC probe's decoding."""

import pytest
import torch
import torch.nn.functional as F
from tiny_salmonn import tiny_batch, write_official_layout

from common.dataset import AudioTextCollator
from teacher.build import build_salmonn
from teacher.qformer import num_windows
from teacher.train import CTCConfig, WithCTC


def test_qformer_ctc_scores_the_transcript_tokens_over_each_clips_windows(tmp_path):
    torch.manual_seed(0)
    model, _ = build_salmonn(write_official_layout(tmp_path))
    trainer = WithCTC(model, CTCConfig(qformer_weight=0.5))
    batch = tiny_batch()
    batch["texts"], batch["tasks"] = ["the cat", "a dog barks"], ["asr", "audiocaption"]
    batch["mel_frames"] = torch.tensor([150, 200])
    batch["target_ids"], batch["labels"] = AudioTextCollator(model.tokenizer).tokenize_targets(batch["texts"])
    terms = trainer(batch)

    # Written out: only the ASR row, its 75 encoder frames' windows, token ids shifted by one for the blank.
    queries = model(batch).qformer_out
    windows = num_windows(75, model.qformer.cfg)
    assert 0 < windows < queries.shape[1]
    ids = torch.tensor(model.tokenizer("the cat", add_special_tokens=False)["input_ids"]) + 1
    log_probs = trainer.qformer_head(queries[:1, :windows]).log_softmax(-1).transpose(0, 1)
    expected = F.ctc_loss(log_probs, ids[None], torch.tensor([windows]), torch.tensor([len(ids)]))
    assert torch.allclose(terms["qformer_ctc"], expected, atol=1e-5)
    assert torch.allclose(terms["loss"], terms["llm"] + 0.5 * terms["qformer_ctc"])

    terms["loss"].backward()
    assert trainer.qformer_head.weight.grad.abs().sum() > 0
    assert model.qformer.query_tokens.grad.abs().sum() > 0  # the aid trains the Q-Former itself


def test_audio_token_aligner_scores_each_target_token_by_its_best_own_window(tmp_path):
    from teacher.train_aids import AudioTokenAligner

    torch.manual_seed(0)
    model, _ = build_salmonn(write_official_layout(tmp_path))
    tok = model.tokenizer
    texts = ["the cat", "a dog barks"]
    vocab = sorted({t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"]})
    aligner = AudioTokenAligner(model, vocab, norm_weight=0.1)
    batch = tiny_batch()
    batch["texts"], batch["tasks"] = texts, ["asr", "audiocaption"]
    batch["mel_frames"] = torch.tensor([150, 200])
    terms = aligner(batch)

    # Written out: cosine of every own window's projected query with every vocab embedding, best window per token.
    audio = model.projector(model.audio_queries(batch)).float()
    emb = model.llm.get_input_embeddings().weight.detach().float()[vocab]
    own = [num_windows(75, model.qformer.cfg), num_windows(100, model.qformer.cfg)]
    logits = torch.stack([(F.normalize(audio[i, :own[i]], dim=-1) @ F.normalize(emb, dim=-1).T).max(0).values
                          for i in range(2)]) * 10.0 - 4.0
    target = torch.tensor([[float(t in tok(text, add_special_tokens=False)["input_ids"]) for t in vocab]
                           for text in texts])
    norm = torch.cat([audio[i, :own[i]].norm(dim=-1) for i in range(2)]).mean()
    expected = F.binary_cross_entropy_with_logits(logits, target) + 0.1 * (norm / emb.norm(dim=-1).mean() - 1) ** 2
    assert torch.allclose(terms["loss"], expected, atol=1e-5)
    terms["loss"].backward()
    assert model.qformer.query_tokens.grad.abs().sum() > 0 and model.llm.get_input_embeddings().weight.grad is None


def test_greedy_ctc_merges_repeats_and_drops_blanks():
    from teacher.ctc_probe import greedy_ctc

    # frames: c c _ a a _ a t → "caat" (a blank separates the two a's), 0 = blank
    assert greedy_ctc([3, 3, 0, 1, 1, 0, 1, 20], "abcdefghijklmnopqrstuvwxyz '") == "caat"
    assert greedy_ctc([0, 0], "ab") == ""


def test_ctc_probe_without_a_pretraining_checkpoint_says_how_to_make_one(tmp_path):
    from teacher.ctc_probe import main as probe_main

    config = tmp_path / "teacher.yaml"
    config.write_text(f"job: teacher.train\noutput_dir: {tmp_path / 'teacher'}\n")
    with pytest.raises(SystemExit, match="no encoder pretraining checkpoint .* ctc.pretrain_steps > 0"):
        probe_main(["--config", str(config)])


def test_relearn_starts_a_fresh_llm_and_projection_and_keeps_the_audio_path(tmp_path):
    """The relearn phase's reset: new LLM and projection weights (the same for the same seed, so a resumed run
    rebuilds them before its checkpoint), the encoders, Q-Former and the frozen Whisper untouched."""
    from teacher.train import fresh_llm_and_projection

    torch.manual_seed(0)
    cfg = write_official_layout(tmp_path)
    model, _ = build_salmonn(cfg)
    model.speech_encoder.requires_grad_(False)
    keep = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("llm.", "projector."))}
    llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    projector_before = model.projector.weight.detach().clone()
    trainable = {k for k, p in model.llm.named_parameters() if p.requires_grad}
    assert trainable and any("lora_" in k for k in trainable)  # the tiny layout's LLM is a path with LoRA
    rng_before = torch.random.get_rng_state()

    fresh_llm_and_projection(model, cfg, seed=3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in keep.items())
    assert not torch.equal(model.projector.weight, projector_before)
    changed = [k for k, v in model.llm.state_dict().items() if not torch.equal(v, llm_before[k])]
    assert any("lora_A" in k for k in changed)
    assert not any(p.requires_grad for p in model.speech_encoder.parameters())
    assert {k for k, p in model.llm.named_parameters() if p.requires_grad} == trainable  # a fresh LoRA
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the run's own random stream goes on unchanged

    first = {k: v.clone() for k, v in model.state_dict().items()}
    fresh_llm_and_projection(model, cfg, seed=3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in first.items())


class _TextSplit:
    """A scanned split's stand-in for the LM pretraining: examples with text, task and prompt."""

    def __init__(self, texts: list[str]):
        from types import SimpleNamespace

        self.examples = [SimpleNamespace(text=t, task="asr", prompt="", path=f"{i}.wav") for i, t in enumerate(texts)]

    def prompt(self, ex) -> str:
        return "Recognize the speech."


def test_lm_pretraining_lowers_the_prompted_lm_loss_and_leaves_only_the_llm_base_changed(tmp_path):
    """The phase trains the LLM's base weights as an LM of targets behind their prompts (no audio tokens), leaves
    the LoRA adapters and the audio path as they were and restores what trains; the saved teacher then carries
    the pretrained base weights and nothing of the phase (no extra tensors)."""
    from teacher.checkpoint import load_model_folder, salmonn_state_dict, save_model_folder
    from teacher.train import JobConfig
    from teacher.train_aids import LMPretrainConfig, PromptedLM, TextTargets, lm_loss, pretrain_llm

    torch.manual_seed(0)
    cfg = write_official_layout(tmp_path / "official")
    model, _ = build_salmonn(cfg)
    texts = ["the cat sat on the mat", "the dog runs", "hello world", "the cat runs on the mat"]
    train = _TextSplit(texts)
    job = JobConfig(lm_pretrain=LMPretrainConfig(steps=40, lr=1.0e-2, warmup_steps=2, batch_size=4),
                    output_dir=str(tmp_path / "teacher"), log_dir=str(tmp_path / "runs"))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    rest_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("llm.")}
    glue_keys = set(salmonn_state_dict(model))

    # The loss by hand: the LLM over [BOS, prompt before, prompt after, target, end], scored on target and end.
    lm = PromptedLM(model).eval()
    collate_texts = TextTargets(train)
    from teacher.train_aids import TextCollator

    batch = TextCollator(model.tokenizer)([collate_texts[0]])
    before, after = model.prompt_ids("Recognize the speech.")
    target = model.tokenizer(texts[0], add_special_tokens=False)["input_ids"] + [model.tokenizer.eos_token_id]
    ids = torch.tensor([before + after + target])
    with torch.no_grad():
        logits = model.llm(input_ids=ids).logits[0, len(before) + len(after) - 1 : -1]
        expected = F.cross_entropy(logits, torch.tensor(target))
        torch.testing.assert_close(lm(batch)["loss"], expected, atol=1e-5, rtol=1e-5)

    scores = pretrain_llm(job, model, train, train, tmp_path / "teacher", run_key="lm")
    # 40 steps at lr 1e-2 on 4 sentences of a 120-token vocabulary: from near-uniform (ln 120 ≈ 4.8 nats) to well
    # under half of it; a loss that merely did not rise would not pass.
    assert scores["lm_loss_after"] < 0.5 * scores["lm_loss_before"]
    assert abs(lm_loss(PromptedLM(model), TextTargets(train), 4) - scores["lm_loss_after"]) < 1e-5
    assert {k for k, p in model.named_parameters() if p.requires_grad} == trainable  # LoRA (and glue) train again
    changed = {k for k, v in model.llm.state_dict().items() if not torch.equal(v, llm_before[k])}
    assert changed and all("lora_" not in k for k in changed)  # the base learned; the adapters did not move
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in rest_before.items())  # the audio path untouched

    save_model_folder(model, cfg, tmp_path / "saved")
    assert set(salmonn_state_dict(model)) == glue_keys  # no tensor of the phase in salmonn.pth
    loaded = load_model_folder(tmp_path / "saved")
    base = model.llm.get_base_model().state_dict()
    for k, v in loaded.llm.get_base_model().state_dict().items():
        torch.testing.assert_close(v, base[k])  # the pretrained base is what the folder holds
