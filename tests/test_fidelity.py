"""Fidelity to the official SALMONN (issue 24): padded batches and the prompt's token ids.

- `beats.padding_features: official` feeds BEATs' outputs at padded tokens, unmasked, through `ln_audio` into the
  Q-Former, as the release's `_encode_auditory_feature` does; "zero" (toy-trained models) zeroes them. The option is
  saved per model folder; folders written before it existed load with the behaviour they were made with.
- A LLaMA-family `tokenizer.model` tokenizes as sentencepiece does (the release used the sentencepiece
  `LlamaTokenizer` of transformers 4.28), whatever its byte fallback and normalizer.
- Both reach the teacher cache's identity, so a cache built before is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from common.dataset import AudioTextCollator
from common.fbank import BEATS_SILENT_FRAME
from common.features import AudioFeaturizer, FeatureConfig
from teacher.build import CheckpointError, LLMConfig, build_salmonn, load_tokenizer
from teacher.checkpoint import MODEL_CONFIG, load_model_folder, read_model_config, save_model_folder
from teacher.salmonn import official_fbank_batch, prompt_pieces
from teacher.tokenizer import PROBE_TEXTS, SentencePieceTokenizer, encoding_identity, sentencepiece_disagreements
from tests.tiny_salmonn import write_official_layout

SP_TEXTS = ["the cat sat on the mat", "hello world", "a dog barks twice", "describe the audio please",
            "recognize the speech", "a high tone followed by three short beeps"] * 20
TEMPLATE_PIECES = ["USER: <Speech>", "</Speech> Recognize the speech.\nASSISTANT:"]
"""The official template's text around `<SpeechHere>`: `<`, `</`, `>`, `\\n` and (for these tiny vocabularies)
upper-case letters outside the vocabulary."""


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    return root, write_official_layout(root)


def two_clip_batch(seed: int = 0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Clips of 2.0 s and 1.3711 s through smolt's featurizer and collator; also the official BEATs input: the
    zero-padded waveforms `[2, samples]` and their sample padding mask (True = padding), as SALMONN's collater."""
    g = torch.Generator().manual_seed(seed)
    wavs = [0.1 * torch.randn(32000, generator=g), 0.1 * torch.randn(21937, generator=g)]
    featurizer = AudioFeaturizer(FeatureConfig(whisper_chunk_seconds=2))  # the tiny Whisper reads 200 frames
    items = [{**featurizer(w.numpy()), "text": "x", "task": "asr", "prompt": "Recognize the speech.", "path": f"{i}",
              "duration": w.shape[0] / 16000, "index": i} for i, w in enumerate(wavs)]
    batch = AudioTextCollator()(items)
    raw_wav = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)
    lengths = torch.tensor([w.shape[0] for w in wavs])
    return batch, raw_wav, torch.arange(raw_wav.shape[1])[None] >= lengths[:, None]


def official_speech_embeds(model, mel: torch.Tensor, raw_wav: torch.Tensor, padding_mask: torch.Tensor):
    """SALMONN's `encode_speech` + `_encode_auditory_feature`, written out from the release: BEATs'
    `extract_features` on the zero-padded waveforms with the sample padding mask, its outputs unmasked, both
    encoders layer-normed, zero-padded to one length, joined, cut into 17-frame windows with `F.unfold`, each
    window read by the Q-Former with an all-ones attention mask, projected. `[batch, windows, llm_dim]`."""
    speech = model.ln_speech(model.speech_encoder(mel).last_hidden_state)
    audio, _ = model.audio_encoder.extract_features(raw_wav, padding_mask)
    audio = model.ln_audio(audio)
    if audio.size(1) < speech.size(1):
        audio = F.pad(audio, (0, 0, 0, speech.size(1) - audio.size(1)))
    elif audio.size(1) > speech.size(1):
        speech = F.pad(speech, (0, 0, 0, audio.size(1) - speech.size(1)))
    embeds = torch.cat((speech, audio), dim=-1)
    b, _, c = embeds.shape
    kernel = round(1500 * 0.333333 / 30.0)
    windows = F.unfold(embeds.transpose(1, 2).unsqueeze(2), kernel_size=(1, kernel), stride=(1, kernel))
    n = windows.shape[-1]
    windows = windows.view(b, -1, kernel, n).permute(0, 3, 2, 1).reshape(-1, kernel, c)
    queries = model.qformer.query_tokens.expand(windows.shape[0], -1, -1)
    atts = torch.ones(windows.shape[:-1], dtype=torch.long)
    out = model.qformer.qformer(query_embeds=queries, encoder_hidden_states=windows,
                                encoder_attention_mask=atts).last_hidden_state
    return model.projector(out).view(b, -1, model.projector.out_features)


@torch.no_grad()
def test_padded_batch_matches_the_official_unmasked_computation(official):
    root, cfg = official
    model, _ = build_salmonn(cfg)
    model.eval()
    assert model.beats_padding == "official"  # the default for a model built from the official checkpoints
    batch, raw_wav, padding_mask = two_clip_batch()
    reference = official_speech_embeds(model, batch["mel"], raw_wav, padding_mask)
    # The same ops in another order (unfold vs view windows, fbank per clip vs per padded waveform): float32
    # rounding only, against outputs of order 1.
    torch.testing.assert_close(model.encode_audio(batch), reference, atol=1e-5, rtol=1e-5)

    # The official fbank and mask differ from the per-clip ones at the padded clip's end: its mask keeps a frame or
    # two more, and the frames after its audio read the fbank of zeros, not 0.
    fbank, mask = official_fbank_batch(batch)
    assert int((~mask[1]).sum()) > int((~batch["fbank_padding_mask"][1]).sum())
    assert torch.allclose(fbank[1, -1], torch.full((128,), BEATS_SILENT_FRAME))

    # The masked variant departs on the padded clip only.
    model.beats_padding = "zero"
    zeroed = model.encode_audio(batch)
    assert torch.allclose(zeroed[0], reference[0], atol=1e-5)  # the longer clip has no padding
    assert (zeroed[1] - reference[1]).abs().max() > 1e-3

    model.beats_padding = "official"
    with pytest.raises(ValueError, match="needs the batch's `fbank_tail` and `samples`"):
        model.encode_audio({k: v for k, v in batch.items() if k != "fbank_tail"})


def test_trim_to_audio_needs_zeroed_padding(official):
    _, cfg = official
    trimmed = dataclasses.replace(cfg, checkpoint="", qformer=dataclasses.replace(cfg.qformer, trim_to_audio=True))
    with pytest.raises(ValueError, match="trim_to_audio needs beats.padding_features: zero"):
        build_salmonn(trimmed)
    model, _ = build_salmonn(dataclasses.replace(trimmed, beats=dataclasses.replace(cfg.beats,
                                                                                    padding_features="zero")))
    assert model.beats_padding == "zero"


def drop_padding_key(folder: Path) -> None:
    """Make `folder`'s salmonn.yaml look as it did before `beats.padding_features` existed."""
    raw = yaml.safe_load((folder / MODEL_CONFIG).read_text())
    del raw["beats"]["padding_features"]
    (folder / MODEL_CONFIG).write_text(yaml.safe_dump(raw, sort_keys=False))


def test_the_option_is_saved_and_old_folders_load_as_they_were_made(official, tmp_path):
    from teacher.assemble import assemble

    _, cfg = official
    zero_cfg = dataclasses.replace(cfg, beats=dataclasses.replace(cfg.beats, padding_features="zero"))
    model, _ = build_salmonn(zero_cfg)
    toy = save_model_folder(model, zero_cfg, tmp_path / "toy")
    assert read_model_config(toy).beats.padding_features == "zero"
    assert load_model_folder(toy).beats_padding == "zero"

    assembled = assemble(cfg, tmp_path / "assembled")
    assert read_model_config(assembled).beats.padding_features == "official"

    # Written before the key: a trained folder (real files) was trained with zeroing; an assembled one (salmonn.pth
    # links to the release) holds the released model.
    drop_padding_key(toy)
    drop_padding_key(assembled)
    assert load_model_folder(toy).beats_padding == "zero"
    assert load_model_folder(assembled).beats_padding == "official"


def test_cache_identity_sees_the_padding_option_and_the_tokenizer_encoding(official, tmp_path):
    from teacher.assemble import assemble
    from teacher.cache import teacher_identity, teacher_tokenizer_identity
    from teacher.cache_store import tokenizer_identity

    _, cfg = official
    folder = assemble(cfg, tmp_path / "assembled")
    new = teacher_identity(str(folder))
    assert new["beats_padding"] == "official"
    raw = yaml.safe_load((folder / MODEL_CONFIG).read_text())
    raw["beats"]["padding_features"] = "zero"
    (folder / MODEL_CONFIG).write_text(yaml.safe_dump(raw, sort_keys=False))
    os.utime(folder / MODEL_CONFIG, ns=(0, 0))  # the file stamps alone would not tell
    assert teacher_identity(str(folder)) != new

    tok = load_tokenizer(cfg.llm)
    old = tokenizer_identity("teacher", tok.get_vocab())  # what caches built before this change recorded
    assert teacher_tokenizer_identity(tok) != old
    assert teacher_tokenizer_identity(tok)["encoding"] == encoding_identity(load_tokenizer(cfg.llm))


# ----- tokenizers ------------------------------------------------------------------------------------------------

def write_sp_folder(folder: Path, **options) -> Path:
    """A LLaMA-style tokenizer folder: a tiny sentencepiece BPE `tokenizer.model` (`<unk>`=0, `<s>`=1, `</s>`=2)
    and a `tokenizer_config.json` naming `LlamaTokenizer`, as Vicuna's does."""
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SP_TEXTS), model_prefix=str(folder / "tokenizer"),
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2, **options)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return folder


LLAMA_STYLE = dict(vocab_size=300, byte_fallback=True, normalization_rule_name="identity",
                   remove_extra_whitespaces=False)
"""As LLaMA's tokenizer.model: byte fallback, no normalization, whitespace kept."""
DEFAULT_STYLE = dict(vocab_size=60, normalization_rule_name="nmt_nfkc")
"""sentencepiece's defaults (as the issue's tiny fixture): no byte fallback, `nmt_nfkc` (`\\n` → `▁`)."""


@pytest.mark.parametrize("style", [LLAMA_STYLE, DEFAULT_STYLE], ids=["byte_fallback_identity", "default_nmt_nfkc"])
def test_llama_tokenizer_encodes_as_sentencepiece(tmp_path, style):
    folder = write_sp_folder(tmp_path / "llm", **style)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = load_tokenizer(LLMConfig(path=str(folder)))
    assert isinstance(tok, SentencePieceTokenizer)
    texts = [*TEMPLATE_PIECES, "an unknown Ω character", "line one\nline two", *PROBE_TEXTS]
    for text in texts:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    assert tok("hello world")["input_ids"] == [sp.bos_id(), *sp.encode("hello world")]
    if not style.get("byte_fallback"):
        assert 0 in sp.encode(TEMPLATE_PIECES[0])  # `<` and `>` are `<unk>`, not dropped
    # SALMONN's [PAD] comes after the sentencepiece vocabulary, and a saved tokenizer loads back the same.
    assert (tok.pad_token, tok.pad_token_id, len(tok)) == ("[PAD]", sp.get_piece_size(), sp.get_piece_size() + 1)
    tok.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(LLMConfig(path=str(tmp_path / "saved")))
    assert [again(t, add_special_tokens=False)["input_ids"] for t in texts] == [sp.encode(t) for t in texts]
    assert again.pad_token_id == tok.pad_token_id
    assert tok.decode(sp.encode("hello world")) == "hello world"


@pytest.mark.parametrize("style", [LLAMA_STYLE, DEFAULT_STYLE], ids=["byte_fallback_identity", "default_nmt_nfkc"])
def test_the_converted_fast_tokenizer_departs_and_the_check_says_so(tmp_path, style, monkeypatch):
    from transformers import LlamaTokenizer

    folder = write_sp_folder(tmp_path / "llm", **style)
    fast = LlamaTokenizer.from_pretrained(folder)  # what AutoTokenizer gives under transformers 5
    assert sentencepiece_disagreements(fast, folder / "tokenizer.model", [*TEMPLATE_PIECES, *PROBE_TEXTS])

    # A tokenizer that departs from sentencepiece (here: loses each text's last piece) is stopped at load.
    encode = SentencePieceTokenizer._tokenize
    monkeypatch.setattr(SentencePieceTokenizer, "_tokenize", lambda self, text, **kw: encode(self, text)[:-1])
    with pytest.raises(CheckpointError, match=r"tokenizer.model: the loaded tokenizer does not encode as"):
        load_tokenizer(LLMConfig(path=str(folder)), ["USER: <Speech>", "caf\u00e9 Ω"])


def test_salmonn_with_a_sentencepiece_llama_wraps_the_official_ids_and_inspect_prints_them(official, tmp_path,
                                                                                          capsys):
    from teacher.inspect import main as inspect_main

    root, cfg = official
    llm = write_sp_folder(tmp_path / "llm", **DEFAULT_STYLE)
    sp = spm.SentencePieceProcessor(model_file=str(llm / "tokenizer.model"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=sp.get_piece_size(), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                 bos_token_id=1, eos_token_id=2)).save_pretrained(llm)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, path=str(llm)), checkpoint="")
    model, _ = build_salmonn(cfg)
    before, after = prompt_pieces(model.prompt_cfg, "Recognize the speech.")
    assert (before, after) == tuple(TEMPLATE_PIECES)
    ids = model.prompt_ids("Recognize the speech.")
    assert ids == ([sp.bos_id(), *sp.encode(before)], sp.encode(after))

    config = tmp_path / "inspect.yaml"
    config.write_text(yaml.safe_dump({"model": dataclasses.asdict(cfg), "instruction": "Recognize the speech."}))
    assert inspect_main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"before audio: {len(ids[0])} ids {ids[0]}" in out
    assert f"after audio: {len(ids[1])} ids {ids[1]}" in out
    assert str(model.tokenizer.convert_ids_to_tokens(ids[1])) in out
