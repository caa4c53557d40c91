"""How well the toy teacher's Whisper encoder alone transcribes: greedy CTC decoding with its pretraining head.

    python -m teacher.ctc_probe --config configs/toy/teacher.yaml [--clips 128] [--step N]

Reads the encoder CTC pretraining checkpoint (`<output_dir>/encoder_pretrain/checkpoints/step_N`, the last one by
default), decodes the first `--clips` ASR clips of the train and valid splits greedily (argmax per frame, repeats
merged, blanks dropped) and prints CER and WER. It bounds what the LLM can read from the speech path: the valid
voices are never heard in training.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below: quiet their known third-party noise
    from common.cli import quiet_third_party_logs

    quiet_third_party_logs()

import argparse
import dataclasses
from pathlib import Path

import jiwer
import torch
from safetensors.torch import load_file

from common.cli import run
from common.config import ConfigError, load_job_config
from common.dataset import AudioTextCollator, AudioTextDataset
from common.feature_store import with_feature_store
from teacher.build import build_salmonn
from teacher.ctc import WithCTC
from teacher.salmonn import crop_mel, run_whisper_encoder


def greedy_ctc(ids: list[int], alphabet: str) -> str:
    """Collapse repeated frame labels, drop blanks (0), map the rest to characters."""
    out, prev = [], 0
    for t in ids:
        if t != prev and t != 0:
            out.append(alphabet[t - 1])
        prev = t
    return "".join(out)


@torch.inference_mode()
def probe(trainer: WithCTC, dataset, clips: int, batch_size: int = 16) -> dict[str, float]:
    encoder = trainer.model.speech_encoder.eval()
    asr = [i for i, ex in enumerate(dataset.examples) if ex.task == "asr"][:clips]
    collate, hyps, refs = AudioTextCollator(), [], []
    for start in range(0, len(asr), batch_size):
        batch = collate([dataset[i] for i in asr[start : start + batch_size]])
        mel = crop_mel(batch) if trainer.model.pad_to_longest else batch["mel"]
        ids = trainer.head(run_whisper_encoder(encoder, mel)).argmax(-1)
        for row, frames in enumerate(((batch["mel_frames"] + 1) // 2).tolist()):
            hyps.append(greedy_ctc(ids[row, :frames].tolist(), trainer.cfg.alphabet))
            refs.append(batch["texts"][row])
    return {"clips": len(refs), "cer": jiwer.cer(refs, hyps), "wer": jiwer.wer(refs, hyps)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m teacher.ctc_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the teacher.train config whose encoder pretraining to read")
    parser.add_argument("--clips", type=int, default=128, help="ASR clips per split")
    parser.add_argument("--step", type=int, default=0, help="checkpoint step (default: the last)")
    args = parser.parse_args(argv)
    cfg = load_job_config(args.config)
    if not hasattr(cfg, "ctc"):
        raise ConfigError(f"{args.config}: --config must be a teacher.train YAML (with `job: teacher.train`)")
    root = Path(cfg.output_dir) / "encoder_pretrain" / "checkpoints"
    steps = sorted(root.glob("step_*"))
    if args.step:
        steps = [root / f"step_{args.step:07d}"]
    if not steps or not (steps[-1] / "trainable.safetensors").is_file():
        raise SystemExit(f"no encoder pretraining checkpoint under {root} (run python -m teacher.train --config "
                         f"{args.config} with ctc.pretrain_steps > 0 first)")
    model, _ = build_salmonn(dataclasses.replace(cfg.model, checkpoint=""))
    trainer = WithCTC(model, cfg.ctc)
    state = load_file(steps[-1] / "trainable.safetensors")
    model.speech_encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
    trainer.head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})
    print(f"encoder CTC checkpoint: {steps[-1]}")
    for split in ("train", "valid"):
        dataset = AudioTextDataset.scan(getattr(cfg.data, split), cfg.data, cfg.features, desc=f"scan {split}")
        if cfg.feature_store:
            dataset = with_feature_store(dataset, cfg.features, cfg.feature_store, split)
        scores = probe(trainer, dataset, args.clips)
        print(f"{split}: {scores['clips']} asr clips, greedy CTC CER {scores['cer']:.4f}, WER {scores['wer']:.4f}")
    return 0


if __name__ == "__main__":
    run(main)
