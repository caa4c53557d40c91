"""GPU check: absolute TTFT, TPOT and peak memory of a preset's teacher and students on one CUDA GPU, as a V100 runs
them (float16, no bf16, no FlashAttention: SDPA limited to its math kernel), under two protocols: the preset's
careful one (medians) and the hackathon evaluator's (10 s input, 10 warm-ups, 100 timed runs, means).

    bash scripts/gpu_check.sh                          # quick preset: outputs/quick/gpu_check.json
    python -m evaluation.gpu_check --preset quick      # the same without the environment checks
    python -m evaluation.gpu_check --dry               # the same code on the CPU, smoke size, few repetitions

The models are the ones the preset's `configs/<preset>/evaluate.yaml` lists (built by `bash scripts/distill.sh
--preset <preset>`); any `key=value` after the options overrides that config (e.g. `models=[...]`, `data.test=[...]`).
No quality is scored: this is the efficiency half of `evaluation.run`, with absolute numbers, since only a GPU gives
absolute times that mean something.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from common.config import ConfigError, load_config
from evaluation.efficiency import ATTENTION_CHOICES, EfficiencyConfig, compare, set_attention
from evaluation.job import JobConfig, efficiency_clips, load_model, load_test_split
from evaluation.memory import release_memory

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HACKATHON_INPUT_SECONDS = 10.0
PER_MODEL_KEYS = ("params", "weight_bytes", "peak_memory_mb", "ttft_ms", "tpot_ms")
"""Headline numbers of every model in the JSON (beside the full statistics and the analytic costs)."""
DRY_REPETITIONS = {"warmup_runs": 1, "timed_runs": 2, "decode_steps": 2, "throughput_runs": 0, "bandwidth_seconds": 0.1}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evaluation.gpu_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="configs/<preset>/evaluate.yaml names the models "
                        "(default quick; smoke with --dry)")
    parser.add_argument("--dry", action="store_true", default=os.environ.get("DRY", "") not in ("", "0"),
                        help="CPU, float32, few repetitions: checks the code path anywhere (also DRY=1)")
    parser.add_argument("--out", default=None, help="JSON to write (default outputs/<preset>/gpu_check.json)")
    parser.add_argument("--attention", default="sdpa_math", choices=ATTENTION_CHOICES,
                        help="sdpa_math (default: SDPA's math kernel only, as on a V100 without FlashAttention), "
                             "sdpa (whatever SDPA picks) or eager (HF's eager attention)")
    parser.add_argument("--protocols", default="careful,hackathon", help="comma-separated: careful, hackathon")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the preset's evaluate.yaml")
    args = parser.parse_args(argv)
    args.preset = args.preset or ("smoke" if args.dry else "quick")
    args.protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    unknown = sorted(set(args.protocols) - {"careful", "hackathon"})
    if unknown or not args.protocols:
        parser.error(f"--protocols: unknown {unknown}; use careful and/or hackathon")
    return args


def job_config(args: argparse.Namespace) -> JobConfig:
    """The preset's evaluation config, placed for the check: CUDA float16 (CPU float32 when dry)."""
    path = CONFIGS / args.preset / "evaluate.yaml"
    if not path.is_file():
        raise SystemExit(f"gpu_check: no {path} (is --preset right, and is this the repository root?)")
    placement = ["device=cpu", "dtype=float32"] if args.dry else ["device=cuda", "dtype=float16"]
    try:
        cfg = load_config(JobConfig, path, [*placement, *args.overrides])
    except ConfigError as err:
        raise SystemExit(f"gpu_check: config error: {err}") from None
    missing = [f"  {ref.name}: {ref.path}" for ref in cfg.models if not Path(ref.path).exists()]
    missing += [f"  test split: {test}" for test in cfg.data.test if not Path(test).exists()]
    if missing:
        raise SystemExit("gpu_check: missing inputs of " + str(path) + ":\n" + "\n".join(missing) +
                         f"\nbuild them with `bash scripts/distill.sh --preset {args.preset}` (or copy outputs/"
                         f"{args.preset}/ and data/ from the machine that ran it); for a quick look, "
                         "`bash scripts/distill.sh --preset smoke` then `bash scripts/gpu_check.sh --preset smoke`")
    if cfg.feature_store and not Path(cfg.feature_store).exists():
        print(f"gpu_check: feature store {cfg.feature_store} not found; computing the clips' features on the fly")
        cfg.feature_store = ""
    return cfg


def protocol_configs(cfg: JobConfig, names: list[str], dry: bool) -> dict[str, EfficiencyConfig]:
    """The preset's careful protocol and the hackathon's; throughput is skipped in the hackathon one (it timed
    latency only). The hackathon's 10 s input is cut to the model's Whisper window when that is shorter."""
    careful = EfficiencyConfig(**{**vars(cfg.efficiency), "protocol": "careful"})
    seconds = min(HACKATHON_INPUT_SECONDS, cfg.features.whisper_chunk_seconds)
    hackathon = EfficiencyConfig(protocol="hackathon", input_seconds=seconds, throughput_runs=0,
                                 decode_steps=cfg.efficiency.decode_steps, prompt=cfg.efficiency.prompt,
                                 bandwidth_seconds=cfg.efficiency.bandwidth_seconds)
    configs = {"careful": careful, "hackathon": hackathon}
    if dry:
        for efficiency in configs.values():
            for key, value in DRY_REPETITIONS.items():
                setattr(efficiency, key, value)
    return {name: configs[name] for name in names}


def environment() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": cuda,
            "torch_cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30,
                    compute_capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported())
    for package in ("transformers", "torchao"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


@contextlib.contextmanager
def sdpa_backends(attention: str) -> Iterator[None]:
    """sdpa_math: every `scaled_dot_product_attention` call uses the math kernel (no FlashAttention, no
    memory-efficient kernel), the attention a V100 without FlashAttention can run everywhere."""
    if attention != "sdpa_math":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def compact(report: dict[str, Any]) -> dict[str, Any]:
    """A model report without its raw samples (the statistics stay)."""
    out = {key: report[key] for key in PER_MODEL_KEYS}
    out["device_peak_memory_mb"] = report["peak_memory"]["device_peak_mb"]
    out["peak_memory"] = report["peak_memory"]
    for key in ("ttft", "tpot"):
        out[key] = {k: v for k, v in report[key].items() if k != "samples_ms"}
    for key in ("decode_flops", "decode_bytes", "prefill_flops", "prefill_bytes", "tpot_floor_ms", "tpot_over_floor",
                "analytic", "throughput_clips_per_s"):
        out[key] = report[key]
    return out


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU visible to torch "
                         f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                         "use --dry (or DRY=1) for the CPU dry run")
    cfg = job_config(args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    protocols = protocol_configs(cfg, args.protocols, args.dry)
    dataset = load_test_split(cfg)
    models = {}
    for ref in cfg.models:
        models[ref.name] = set_attention(load_model(ref, cfg.device, cfg.dtype), args.attention)
    result: dict[str, Any] = {
        "environment": environment(),
        "settings": {"preset": args.preset, "dry": args.dry, "device": cfg.device, "dtype": cfg.dtype,
                     "attention": args.attention, "models": {ref.name: ref.path for ref in cfg.models},
                     "reference": cfg.models[0].name},
        "protocols": {},
    }
    for name, efficiency in protocols.items():
        cfg.efficiency = efficiency
        clips = efficiency_clips(dataset, cfg)
        with sdpa_backends(args.attention):
            report = compare(models, clips, efficiency, reference=cfg.models[0].name)
        result["protocols"][name] = {
            "settings": report["settings"],
            "models": {model: compact(r) for model, r in report["models"].items()},
            "ratios": report["ratios"],
        }
        print(format_protocol(name, result["protocols"][name]))
    del models
    release_memory()
    result["wall_s"] = time.perf_counter() - started
    return result


def format_protocol(name: str, block: dict[str, Any]) -> str:
    settings = block["settings"]
    lines = [f"\n{name}: {settings['warmup_runs']} warm-ups, {settings['timed_runs']} timed runs, "
             f"{settings['statistic']}s, input {settings['input_seconds'] or 'as in the test split'} s, "
             f"devices {settings['devices']} {settings['cuda_devices']}",
             f"{'model':<12}{'params':>12}{'weights MiB':>13}{'peak MiB':>10}{'TTFT ms':>10}{'TPOT ms':>10}"
             f"{'TPOT floor ms':>15}"]
    for model, r in block["models"].items():
        peak = "n/a" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.1f}"
        floor = r.get("tpot_floor_ms")
        floor = "n/a" if floor is None else f"{floor:.3f}"
        lines.append(f"{model:<12}{r['params']:>12,}{r['weight_bytes'] / 2**20:>13.1f}{peak:>10}"
                     f"{r['ttft_ms']:>10.2f}{r['tpot_ms']:>10.3f}{floor:>15}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run_check(args)
    out = Path(args.out or Path("outputs") / args.preset / ("gpu_check_dry.json" if args.dry else "gpu_check.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(f"\ngpu_check: {len(result['settings']['models'])} models, {len(result['protocols'])} protocols in "
          f"{result['wall_s']:.0f} s → {out}")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
