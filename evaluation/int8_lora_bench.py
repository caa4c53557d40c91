"""LoRA over an fp32 frozen base against the same LoRA over an int8 frozen base (`model.llm.int8_frozen`,
`model.whisper.int8_frozen`): peak memory, step time and loss after the same steps, back to back in one process.

    python -m evaluation.int8_lora_bench --out outputs/bench/int8_lora.json          # about 70 s of one core
    python -m evaluation.int8_lora_bench --hidden 256 --layers 2 --steps 4           # a quick look

The model is SALMONN's shape at a small size, built by `teacher.build.build_salmonn` from fresh parts: a frozen
Whisper encoder (`--whisper-dim` × 4 layers over 3 s of mel), no BEATs, the window Q-Former, and a frozen LLaMA
(`--hidden` × `--layers`, MLP 8/3 × hidden) with LoRA (r 8, alpha 16) on q_proj and v_proj, its BPE tokenizer trained
on the task's texts. Both runs build the same seeded weights (the int8 run then quantizes the frozen linear layers),
see the same batches and train the LoRA adapters and the glue (Q-Former, projection, layer norms) with the shared
loop (`common.training.fit`: AdamW, fp32 activations, one optimizer step per batch).

The task: sentences of a small grammar, each with a random mel clip, so what LoRA learns is the grammar's language
(the audio carries nothing); the loss falls fast enough to compare within a few dozen steps. Quality = the training
loss over the last steps and the loss on held-out sentences after training, beside the int8 base's logit error
before training (max |int8 − fp32| / max |fp32| on a held-out batch).

Memory, per run: `weights` is the exact bytes of every parameter (int8 values and fp32 scales for quantized
weights); `training growth` is `evaluation.memory.PeakMemoryMeter` over `fit` (on a CPU the resident set's peak
growth: gradients, AdamW states, activations, the int8 matmuls' transient dequantized weights), started after the
model is built; `total` is their sum. A first run in a process also pays one-time allocations that later runs reuse,
so a tiny untimed run of both variants goes first. Step time: the median wall time between optimizer steps after
`--warmup` steps; the ratio int8 / fp32 is what carries over, not the absolute times (DESIGN.md: this CPU is shared).
torchao's weight-only int8 casts the weight to the activation dtype at every matmul: on a CPU it saves memory, not
time (`evaluation.int8_speed` measures the same for decoding).
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below: quiet their known third-party noise
    from common.cli import quiet_third_party_logs

    quiet_third_party_logs()

import argparse
import gc
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common.bpe import train_bpe
from common.cli import run
from common.dataset import AudioTextCollator
from common.int8_frozen import is_int8
from common.tracking import MetricLogger, read_metrics
from common.training import LoopConfig, OptimConfig, fit, seed_everything
from evaluation.memory import MIB, PeakMemoryMeter, release_memory
from teacher.build import BeatsEncoderConfig, LLMConfig, LoraSpec, SalmonnConfig, WhisperEncoderConfig, build_salmonn
from teacher.qformer import QFormerConfig

SUBJECTS = ["the cat", "a dog", "my neighbour", "the old man", "a small bird", "the teacher", "our train", "the wind"]
VERBS = ["sees", "follows", "hears", "paints", "carries", "calls", "finds", "leaves"]
OBJECTS = ["the red door", "a green boat", "the quiet river", "two black shoes", "the morning bus", "a paper kite"]
ENDINGS = ["today", "at night", "in the rain", "near the station", "every monday", "without a word"]
PROMPT = "Transcribe the speech."
MEL_FRAMES = 300  # 3 s of 10 ms mel frames; Whisper reads exactly 2 × max_source_positions


def sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for words in (SUBJECTS, VERBS, OBJECTS, ENDINGS)) for _ in range(count)]


def items(texts: list[str], seed: int) -> list[dict]:
    """Dataset items: a random mel `[80, MEL_FRAMES]`, the prompt and the text."""
    generator = torch.Generator().manual_seed(seed)
    return [{"mel": torch.randn(80, MEL_FRAMES, generator=generator), "prompt": PROMPT, "text": text}
            for text in texts]


def collator(tokenizer):
    targets = AudioTextCollator(tokenizer)

    def collate(batch_items: list[dict]) -> dict:
        batch = {"mel": torch.stack([item["mel"] for item in batch_items]),
                 "prompts": [item["prompt"] for item in batch_items]}
        batch["target_ids"], batch["labels"] = targets.tokenize_targets([item["text"] for item in batch_items])
        return batch

    return collate


class InOrder:
    """The loop's batch sampler: consecutive batches of `batch_size` indices, the same order every epoch."""

    def __init__(self, count: int, batch_size: int) -> None:
        self.batches = [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)


def model_config(args: argparse.Namespace, tokenizer_dir: Path, int8: bool) -> SalmonnConfig:
    heads = max(1, args.hidden // 64)
    return SalmonnConfig(
        whisper=WhisperEncoderConfig(d_model=args.whisper_dim, encoder_layers=4,
                                     encoder_attention_heads=max(1, args.whisper_dim // 64),
                                     encoder_ffn_dim=4 * args.whisper_dim, max_source_positions=MEL_FRAMES // 2,
                                     freeze=True, int8_frozen=int8),
        beats=BeatsEncoderConfig(enabled=False),
        qformer=QFormerConfig(hidden_size=128, num_attention_heads=2, intermediate_size=256, dropout=0.0),
        llm=LLMConfig(tokenizer=str(tokenizer_dir), hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                      freeze=True, int8_frozen=int8),
        lora=LoraSpec(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a parameter holds: int8 values and fp32 scales for an int8 weight, else elements × element size."""
    if is_int8(tensor):
        return tensor.qdata.numel() * tensor.qdata.element_size() + tensor.scale.numel() * tensor.scale.element_size()
    return tensor.numel() * tensor.element_size()


def parameter_bytes(model) -> tuple[int, int]:
    """(every parameter's bytes, the bytes of the frozen linear layers `int8_frozen` quantizes: the LLM's and
    Whisper's `nn.Linear` weights but the LoRA adapters and a head tied to the embeddings)."""
    total = sum(tensor_bytes(p) for p in model.parameters())
    embedding = model.llm.get_input_embeddings().weight
    frozen = sum(tensor_bytes(m.weight) for part in (model.llm, model.speech_encoder)
                 for name, m in part.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".lora_" not in name and m.weight is not embedding)
    return total, frozen


@torch.no_grad()
def held_out_loss(model, batches: list[dict]) -> float:
    model.eval()
    return statistics.fmean(float(model(batch).loss) for batch in batches)


def one_run(args: argparse.Namespace, tokenizer_dir: Path, int8: bool, train: list[dict], held_out: list[dict],
            work: Path) -> tuple[dict, torch.Tensor]:
    """Build, train and measure one variant; returns (its row, its logits on the first held-out batch before
    training)."""
    seed_everything(args.seed)
    model, _ = build_salmonn(model_config(args, tokenizer_dir, int8))
    collate = collator(model.tokenizer)
    held_batches = [collate(held_out[i:i + args.batch_size]) for i in range(0, len(held_out), args.batch_size)]
    model.eval()
    with torch.no_grad():
        logits_before = model(held_batches[0]).logits.float()
    weights, frozen_linear = parameter_bytes(model)
    stamps: list[float] = []
    loop = LoopConfig(max_steps=args.steps, batch_size=args.batch_size, log_every=1, eval_every=10**6,
                      save_every=10**6, resume=False, seed=args.seed)
    out = work / ("int8" if int8 else "fp32")
    release_memory()
    meter = PeakMemoryMeter(torch.device("cpu"))
    meter.start()
    with MetricLogger(out / "logs", backends=("jsonl",), owner=out) as logger:
        fit(model, train, InOrder(len(train), args.batch_size), collate, lambda m, b: {"loss": m(b).loss}, loop,
            OptimConfig(lr=args.lr, warmup_steps=max(1, args.steps // 10), weight_decay=0.0), out, logger,
            before_step=lambda m, step: stamps.append(time.perf_counter()))
    growth = meter.stop()
    losses = [r["train/loss"] for r in read_metrics(out / "logs") if "train/loss" in r]
    steps = [b - a for a, b in zip(stamps[args.warmup:-1], stamps[args.warmup + 1:], strict=True)]
    last = max(1, args.steps // 5)
    row = {"base": "int8" if int8 else "fp32", "weights_mb": weights / MIB, "frozen_linear_mb": frozen_linear / MIB,
           "training_growth_mb": (growth or 0) / MIB, "total_mb": (weights + (growth or 0)) / MIB,
           "step_s": statistics.median(steps) if steps else float("nan"),
           "first_loss": losses[0], "train_loss_last": statistics.fmean(losses[-last:]),
           "held_out_loss": held_out_loss(model, held_batches), "meter": meter.description}
    del model
    gc.collect()
    return row, logits_before


def bench(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    train_texts = sentences(args.train_clips, args.seed)
    held_texts = sentences(args.held_out_clips, args.seed + 1)
    train, held_out = items(train_texts, args.seed), items(held_texts, args.seed + 1)
    with tempfile.TemporaryDirectory(prefix="int8_lora_bench_") as tmp:
        work = Path(tmp)
        tokenizer = train_bpe(train_texts + held_texts + [PROMPT, "USER: <Speech><SpeechHere></Speech>"] * 20, 300,
                              "llama")
        tokenizer.save_pretrained(work / "tokenizer")
        # A first run in a process pays for one-time allocations (library state, thread pools, allocator arenas)
        # that a second one reuses: a tiny untimed run of both variants takes them first.
        tiny = argparse.Namespace(**{**vars(args), "hidden": 64, "layers": 1, "whisper_dim": 64, "steps": 2,
                                     "warmup": 0})
        for int8 in (False, True):
            one_run(tiny, work / "tokenizer", int8, train[: 2 * args.batch_size], held_out[: args.batch_size],
                    work / "untimed")
        rows, logits = [], []
        for int8 in (False, True):
            row, before = one_run(args, work / "tokenizer", int8, train, held_out, work)
            rows.append(row)
            logits.append(before)
            print(json.dumps(row), flush=True)
    fp32, int8 = rows
    return {"rows": rows,
            "ratios": {"total_memory": int8["total_mb"] / fp32["total_mb"],
                       "weights": int8["weights_mb"] / fp32["weights_mb"],
                       "frozen_linear": int8["frozen_linear_mb"] / fp32["frozen_linear_mb"],
                       "step_time": int8["step_s"] / fp32["step_s"]},
            "int8_logit_error_before_training": float((logits[1] - logits[0]).abs().max() / logits[0].abs().max()),
            "settings": {k: v for k, v in vars(args).items() if k != "out"}}


def table(result: dict) -> str:
    lines = ["| frozen base | weights MB | frozen linear MB | training growth MB | total MB | step s | first loss | "
             "train loss (last steps) | held-out loss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['base']} | {r['weights_mb']:.1f} | {r['frozen_linear_mb']:.1f} | "
                     f"{r['training_growth_mb']:.1f} | {r['total_mb']:.1f} | {r['step_s']:.3f} | "
                     f"{r['first_loss']:.3f} | {r['train_loss_last']:.3f} | {r['held_out_loss']:.3f} |")
    ratios = result["ratios"]
    lines.append("")
    lines.append(f"int8 / fp32: total memory {ratios['total_memory']:.3f}, weights {ratios['weights']:.3f}, frozen "
                 f"linear layers {ratios['frozen_linear']:.3f}, step time {ratios['step_time']:.2f}; int8 base's "
                 f"logit error before training {result['int8_logit_error_before_training']:.2e} (max |Δ| / max |fp32|)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.int8_lora_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768, help="LLM width (default 768)")
    parser.add_argument("--layers", type=int, default=12, help="LLM layers (default 12)")
    parser.add_argument("--whisper-dim", type=int, default=384, help="Whisper encoder width (4 layers)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the step time")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-clips", type=int, default=64)
    parser.add_argument("--held-out-clips", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = bench(args)
    print(table(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run(main)
