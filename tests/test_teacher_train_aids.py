"""The toy teacher's training aids: the Q-Former CTC term (transcript tokens over the Q-Former windows)."""

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
