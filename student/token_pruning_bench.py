"""BEATs FLOPs and latency against the token keep ratio: the benchmark of `student.token_pruning`.

    python -m student.token_pruning_bench --out outputs/toy/bench/token_pruning.json

`bench` runs one BEATs pruned at several keep ratios, interleaved at batch 1, and prints analytic FLOPs
(`student.token_pruning.beats_cost`) beside the median latency; `--out` writes the rows that
`python -m experiments figures` draws.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below: quiet their known third-party noise
    from common.cli import quiet_third_party_logs

    quiet_third_party_logs()

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from common.cli import run
from student.token_pruning import PrunedBEATs, TokenPruningConfig, beats_cost, fbank_frames, patch_tokens
from teacher.beats import FBANK_BINS, BEATs, BEATsConfig

TOY_BENCH_CONFIG = dict(
    input_patch_size=16,
    embed_dim=128,
    encoder_layers=3,
    encoder_embed_dim=192,
    encoder_ffn_embed_dim=768,
    encoder_attention_heads=4,
    conv_pos=32,
    conv_pos_groups=8,
    relative_position_embedding=True,
    gru_rel_pos=True,
    deep_norm=True,
)
"""The BEATs that `python -m student.token_pruning_bench` benchmarks when no `--config` is given."""


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(
    beats: BEATs,
    ratios: Sequence[float] = (1.0, 0.75, 0.5, 0.25),
    seconds: float = 10.0,
    runs: int = 20,
    warmup: int = 3,
    pruning: TokenPruningConfig | None = None,
    seed: int = 0,
) -> list[dict]:
    """FLOPs and latency of `beats` pruned at each keep ratio; prints a table and returns its rows.

    Batch 1, a random fbank of `seconds`, `forward_fbank` under inference mode on `beats`' device and dtype.
    The models run interleaved (order reversed every other run) so that drift on a shared machine falls on all
    of them alike; latency is the median of `runs` timed passes after `warmup` untimed ones. Ratios are taken
    against the first entry of `ratios`. `pruning` gives everything but the keep ratio (default: prune after
    `default_prune_layers`, attention scores, fuse).
    """
    template = pruning or TokenPruningConfig(prune_after_layers=default_prune_layers(beats.cfg.encoder_layers))
    models = [
        PrunedBEATs.from_beats(beats, dataclasses.replace(template, keep_ratio=ratio)).eval() for ratio in ratios
    ]
    weight = beats.patch_embedding.weight
    generator = torch.Generator().manual_seed(seed)
    fbank = torch.randn(1, fbank_frames(seconds), FBANK_BINS, generator=generator)
    fbank = fbank.to(device=weight.device, dtype=weight.dtype)
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for run in range(warmup + runs):
            order = range(len(models)) if run % 2 == 0 else reversed(range(len(models)))
            for i in order:
                _synchronize(weight.device)
                start = time.perf_counter()
                models[i].forward_fbank(fbank)
                _synchronize(weight.device)
                if run >= warmup:
                    times[i].append((time.perf_counter() - start) * 1e3)
    rows = []
    for model, model_times in zip(models, times, strict=True):
        cost = beats_cost(beats.cfg, model.pruning_config, seconds)
        rows.append({
            "keep_ratio": model.pruning_config.keep_ratio,
            "tokens": cost["tokens_per_layer"][-1],
            "gflops": cost["total"] / 1e9,
            "latency_ms": statistics.median(model_times),
        })
    for row in rows:
        row["flops_ratio"] = row["gflops"] / rows[0]["gflops"]
        row["latency_ratio"] = row["latency_ms"] / rows[0]["latency_ms"]
    print(format_table(rows, patch_tokens(beats.cfg, seconds), template, seconds, runs, weight.device))
    return rows


def format_table(rows: Sequence[dict], n_tokens: int, template: TokenPruningConfig, seconds: float, runs: int,
                 device: torch.device) -> str:
    """The `bench` rows as a plain-text table, with a header line saying what was measured."""
    header = (f"BEATs on {seconds:g} s ({n_tokens} patch tokens), batch 1, {device}, median of {runs} runs; "
              f"prune after layers {sorted(template.prune_after_layers)}, score={template.score}, "
              f"merge={template.merge}, segment_seconds={template.segment_seconds:g}")
    lines = [header, "keep_ratio  tokens  GFLOPs  FLOPs_ratio  latency_ms  latency_ratio"]
    for row in rows:
        lines.append(f"{row['keep_ratio']:>10.2f}  {row['tokens']:>6d}  {row['gflops']:>6.3f}  "
                     f"{row['flops_ratio']:>11.3f}  {row['latency_ms']:>10.2f}  {row['latency_ratio']:>13.3f}")
    return "\n".join(lines)


def default_prune_layers(n_layers: int) -> list[int]:
    """Prune after the layers at about 1/4, 1/2 and 3/4 of the depth (EViT's 4th, 7th, 10th of 12 → [2, 5, 8])."""
    layers = {max(0, round(n_layers * quarter) - 1) for quarter in (0.25, 0.5, 0.75)}
    return sorted(layer for layer in layers if layer < n_layers - 1)


def load_beats(config: str | None) -> BEATs:
    """A BEATs from a checkpoint path (`.pt`), a JSON config dict (random weights), or None (`TOY_BENCH_CONFIG`)."""
    if config is None:
        return BEATs(BEATsConfig.from_dict(TOY_BENCH_CONFIG)).eval()
    if config.lstrip().startswith("{"):
        return BEATs(BEATsConfig.from_dict(json.loads(config))).eval()
    return BEATs.from_checkpoint(config)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="python -m student.token_pruning_bench", description="BEATs FLOPs and latency against token keep ratio."
    )
    parser.add_argument("--config", help="BEATs .pt checkpoint, or a JSON dict of BEATsConfig fields (random "
                                         "weights); default: a toy BEATs (TOY_BENCH_CONFIG)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per ratio")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per ratio first")
    parser.add_argument("--layers", type=int, nargs="+", help="prune after these 0-based layers "
                                                              "(default: about 1/4, 1/2, 3/4 of the depth)")
    parser.add_argument("--score", choices=["attention", "norm"], default="attention")
    parser.add_argument("--merge", choices=["fuse", "tome", "drop"], default="fuse")
    parser.add_argument("--segment-seconds", type=float, default=0.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", help="also write the rows as JSON here (what `python -m experiments figures` reads)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    beats = load_beats(args.config).to(device=args.device, dtype=getattr(torch, args.dtype))
    layers = args.layers if args.layers is not None else default_prune_layers(beats.cfg.encoder_layers)
    pruning = TokenPruningConfig(prune_after_layers=layers, score=args.score, merge=args.merge,
                                 segment_seconds=args.segment_seconds)
    rows = bench(beats, args.ratios, args.seconds, args.runs, args.warmup, pruning)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        Path(args.out).write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    run(main)
