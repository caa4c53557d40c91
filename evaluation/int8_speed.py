"""Which int8 scheme decodes faster than float32 here: one toy-size LLM's decode step (batch 1, static KV cache) in
float32, torchao int8 weight-only, torchao int8 dynamic-activation int8-weight and FBGEMM's x86 dynamic int8
(`prune.int8`'s schemes), each eager and (the torchao ones) under `torch.compile`, timed in one process, round-robin,
with medians; and which share of a step the linear layers take.

    python -m evaluation.int8_speed                       # the quick student's LLM shape (Gemma-2, d 192 × 4)
    python -m evaluation.int8_speed --hidden 1024 --mlp 4096 --layers 8 --no-compile

Why: torchao's weight-only int8 casts the int8 weight to the activation dtype at every matmul, so on a CPU an eager
decode step gets slower, not faster; `torch.compile` can fuse that cast into the matmul, and the dynamic scheme
multiplies int8 by int8 (`torch._int_mm`). Every variant decodes the same `--steps` positions after the same prompt,
repeatedly (a static cache is overwritten in place, so every repetition sees the same shapes); a repetition times
`--steps` steps of each variant in turn, the order rotated each time, so drift on a shared machine falls on all alike.

The linear share, measured two ways: `<variant> linears` replays the calls of every linear layer (LM head included)
of one decode alone (recorded module and input), timed the same way, and `linear_share` is their time over the
step's; `no linear work` decodes with every linear layer replaced by zeros of its output shape, in place. What is
left (norms, rotary embeddings, attention over the cache, the cache update, Hugging Face's Python per layer, the
argmax) is what no weight format can shorten: `no linear work` × float32 is the lowest TPOT ratio any int8 scheme
could reach.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

SCHEMES = ("float32", "int8_weight_only", "int8_dynamic", "int8_dynamic_x86")
COMPILABLE = ("float32", "int8_weight_only", "int8_dynamic")
"""FBGEMM's packed weight is an opaque TorchScript object: torch.compile would only run it eagerly between graphs."""


def toy_llm(args: argparse.Namespace) -> nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                          query_pre_attn_scalar=args.head_dim, max_position_embeddings=512, tie_word_embeddings=True)
    return Gemma2ForCausalLM(config).eval()


def quantized(model: nn.Module, scheme: str) -> nn.Module:
    """A copy of `model` with every linear layer but the LM head in `scheme` (prune.quantize's choice of layers)."""
    from prune.int8 import quantize_modules

    model = copy.deepcopy(model)
    if scheme != "float32":
        names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]
        quantize_modules(model, names, scheme)
    return model


def decoder(model: nn.Module, prompt: int, steps: int, compile_step: bool) -> Callable[[], float]:
    """A function that decodes `steps` tokens after a `prompt`-token prefill (in a static cache) and returns the
    median ms per step."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt + steps)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt))
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt), use_cache=True)

    def step(token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        # position_ids given, so the model does not derive them from a Python int (a recompile per position)
        logits = model(input_ids=token, past_key_values=cache, cache_position=position, position_ids=position[None],
                       use_cache=True).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    run = torch.compile(step, dynamic=False) if compile_step else step
    positions = [torch.tensor([prompt + i]) for i in range(steps)]

    def decode() -> float:
        for layer in cache.layers:  # rewind the static cache to the prompt: same positions, same shapes every time
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length.fill_(prompt)
        token, times = ids[:, -1:], []
        with torch.inference_mode():
            for position in positions:
                start = time.perf_counter()
                token = run(token, position)
                times.append((time.perf_counter() - start) * 1e3)
        return float(np.median(times))

    return decode


class NoLinearWork(nn.Module):
    """Stands in for a linear layer at no matmul cost: zeros of the layer's output shape."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def without_linear_work(model: nn.Module) -> nn.Module:
    """A copy of `model` whose linear layers (LM head included) cost nothing: its decode step is what no weight
    format can shorten (the outputs are meaningless, the work around the matmuls is the same)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, NoLinearWork(module.out_features))
    return model


def linear_replay(model: nn.Module, decode: Callable[[], float], steps: int) -> Callable[[], float]:
    """A function that replays the linear-layer calls of one `decode()` (`steps` steps) and returns ms per step."""
    from common.int8_x86 import X86DynamicLinear

    calls: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: calls.append((m, args[0].clone())))
             for m in model.modules() if isinstance(m, (nn.Linear, X86DynamicLinear))]
    try:
        decode()
    finally:
        for hook in hooks:
            hook.remove()

    def replay() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            for module, x in calls:
                module(x)
            return (time.perf_counter() - start) * 1e3 / steps

    return replay


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m evaluation.int8_speed", description=__doc__.split("\n\n")[0])
    for name, default in (("hidden", 192), ("mlp", 512), ("layers", 4), ("heads", 4), ("kv-heads", 2),
                          ("head-dim", 48), ("vocab", 800), ("prompt", 48), ("steps", 8), ("reps", 40),
                          ("warmups", 5), ("threads", 1)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager variants only")
    parser.add_argument("--out", default="", help="write the result as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64  # one compiled graph per variant; they share the step's code object
    base = toy_llm(args)
    variants = {}
    for scheme in SCHEMES:
        model = quantized(base, scheme)
        for compiled in (False, True) if args.compile and scheme in COMPILABLE else (False,):
            name = f"{scheme}{' compiled' if compiled else ''}"
            started = time.perf_counter()
            variants[name] = decoder(model, args.prompt, args.steps, compiled)
            for _ in range(args.warmups):  # the first calls compile (and fill the allocator)
                variants[name]()
            if not compiled:
                variants[f"{name} linears"] = linear_replay(model, variants[name], args.steps)
            print(f"{name}: ready in {time.perf_counter() - started:.1f} s", flush=True)
    variants["no linear work"] = decoder(without_linear_work(base), args.prompt, args.steps, False)
    for _ in range(args.warmups):
        variants["no linear work"]()
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(variants[name]())
    fp32 = float(np.median(samples["float32"]))
    result = {"settings": {**vars(args), "torch": torch.__version__, "threads": torch.get_num_threads()},
              "tpot_ms": {name: float(np.median(s)) for name, s in samples.items()},
              "tpot_min_ms": {name: float(np.min(s)) for name, s in samples.items()}}
    result["ratio_to_float32"] = {name: ms / fp32 for name, ms in result["tpot_ms"].items()}
    result["linear_share"] = {name[: -len(" linears")]: ms / result["tpot_ms"][name[: -len(" linears")]]
                              for name, ms in result["tpot_ms"].items() if name.endswith(" linears")}
    print(f"\n{'variant':<32}{'ms per step':>12}{'min ms':>10}{'× float32':>11}{'linear share':>14}")
    for name in names:
        share = result["linear_share"].get(name)
        print(f"{name:<32}{result['tpot_ms'][name]:>12.3f}{result['tpot_min_ms'][name]:>10.3f}"
              f"{result['ratio_to_float32'][name]:>11.3f}{'' if share is None else f'{share:>14.2f}'}")
    print("(`<variant> linears`: that variant's linear-layer calls of a step replayed alone; the share is their time "
          "over the step's)")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
