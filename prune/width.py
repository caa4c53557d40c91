"""Structured width pruning of the student's parts, the same number of channels or heads in every layer.

What is pruned, and through which torch-pruning (1.6.1) call:

- LLM (Gemma-2, LLaMA) MLP channels: DepGraph on each layer's `mlp` module alone, group
  {gate_proj out, up_proj out, down_proj in}.
- LLM attention, GQA-aware: whole KV groups leave with the query heads that read them, or the same number of query
  heads leaves every KV group; torch-pruning's low-level `prune_linear_out_channels` / `prune_linear_in_channels`
  on q/k/v/o.
- Whisper encoder MLP channels {fc1 out, fc2 in} and heads {q/k/v out, out_proj in}: DepGraph on each layer.
- BEATs MLP channels {fc1 out, fc2 in}: DepGraph on each layer.

DepGraph never sees a LLaMA/Gemma-2 attention projection: with transformers 5 the pruning group of `q_proj` keeps
growing and never returns (torch-pruning issue #527). `depgraph` refuses such a module (`check_depgraph_scope`) and
stops any build or group query that runs past a time limit. Every DepGraph group is checked against the modules it
must hold (`expect_group`), so a coupling that reaches further (a norm, the residual stream) is an error, not a
silently different model.

Embeddings, the tied LM head, every hidden size, the Q-Former and the projection are left alone. Hidden sizes stay
because Gemma-2 scales its input embeddings by √hidden_size, computed at construction from the config
(`Gemma2TextScaledWordEmbedding.embed_scale`, a non-persistent buffer in transformers 5.23): a narrower hidden size
would silently change the scale on reload. `check_embedding_scale` asserts it did not change.

Importance (`Criterion`): "magnitude" (squared L2 norm of every weight slice a unit owns: torch-pruning's
GroupMagnitudeImportance(p=2) for DepGraph groups, the same sum for heads), "taylor" (|w · ∂L/∂w| summed over the
same slices, from gradients already accumulated by a calibration pass: GroupTaylorImportance), "random" (baseline).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch_pruning as tp
from torch import nn

from teacher.build import HEADS_KEPT

Criterion = Literal["magnitude", "taylor", "random"]
HeadMode = Literal["kv_groups", "query_heads"]
LLM_ARCHITECTURES = ("llama", "gemma2")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class PruningError(RuntimeError):
    """A model or a request that this pruner cannot handle; the message says what and why."""


class DepGraphScopeError(PruningError):
    """A module with LLaMA/Gemma-2 attention projections was about to be handed to DepGraph (upstream hang)."""


@dataclass
class Widths:
    """Per-layer widths of the prunable parts (every layer of a part has the same width)."""

    llm_mlp: int
    """LLM intermediate_size."""
    llm_heads: int
    """LLM query heads."""
    llm_kv_heads: int
    """LLM key/value heads."""
    whisper_mlp: int
    """Whisper encoder_ffn_dim."""
    whisper_heads: int
    """Whisper heads per layer."""
    beats_mlp: int
    """BEATs encoder_ffn_embed_dim (0 without BEATs)."""


def kept_channels(total: int, ratio: float, multiple: int) -> int:
    """Channels left of `total` after removing `ratio` of them, rounded to a multiple of `multiple` (≥ multiple)."""
    if ratio <= 0:
        return total
    kept = total - math.floor(total * ratio + 1e-9)
    if multiple > 1:
        kept = max(multiple, math.floor(kept / multiple + 0.5) * multiple)  # halves round up: keep more
    return min(kept, total)


def kept_units(total: int, ratio: float) -> int:
    """Whole units (heads, KV groups) left of `total` after removing `ratio` of them, at least one."""
    return max(1, total - math.floor(total * ratio + 1e-9))


# ----- guards ------------------------------------------------------------------------------------------------------


def check_depgraph_scope(module: nn.Module, architecture: str) -> None:
    """Refuse a LLaMA/Gemma-2 module that holds attention projections (torch-pruning #527: the group never returns)."""
    if architecture not in LLM_ARCHITECTURES:
        return
    found = [name for name, _ in module.named_modules() if name.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS]
    if found:
        raise DepGraphScopeError(
            f"refusing to build a torch-pruning DependencyGraph over {architecture} attention projections "
            f"({', '.join(found[:4])}): the q_proj group never returns with transformers 5 (torch-pruning #527). "
            "Hand DepGraph only the MLP; attention heads are pruned with tp.prune_linear_*_channels."
        )


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise TimeoutError if the body runs longer than `seconds` (SIGALRM; only in the main thread, else no limit)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{what} ran longer than {seconds:g} s; torch-pruning's dependency search did not finish "
                           "(see torch-pruning #527 for the known LLaMA/Gemma-2 attention case)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class DepGraphLog:
    """Names of the modules handed to DepGraph, and the time limit for each build and group query."""

    timeout_s: float = 60.0
    modules: list[str] | None = None

    def record(self, name: str) -> None:
        if self.modules is None:
            self.modules = []
        self.modules.append(name)


def depgraph(module: nn.Module, example: torch.Tensor, name: str, architecture: str, log: DepGraphLog,
             forward_fn: Callable | None = None) -> tp.DependencyGraph:
    """A DependencyGraph of `module` traced on `example`, after the scope check and under the time limit."""
    check_depgraph_scope(module, architecture)
    log.record(name)
    flags = {p: p.requires_grad for p in module.parameters()}
    module.requires_grad_(True)  # tracing follows grad_fn; frozen parts would leave no graph
    try:
        with torch.enable_grad(), time_limit(log.timeout_s, f"DependencyGraph of {name}"):
            graph = tp.DependencyGraph().build_dependency(
                module, example_inputs=example, forward_fn=forward_fn, output_transform=_first_tensor, verbose=False)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return graph


def _first_tensor(out):
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.sum()


def expect_group(group, expected: set[tuple[nn.Module, Callable]], name: str) -> None:
    """Check that a DepGraph group prunes exactly `expected` (module, pruning function) pairs among Linear layers
    and touches no other parametrised module."""
    found = set()
    for dep, _ in group:
        layer = dep.target.module
        if isinstance(layer, nn.Module) and any(True for _ in layer.parameters(recurse=False)):
            found.add((layer, dep.handler))
    if found != expected:
        extra = [f"{type(m).__name__}.{fn.__name__}" for m, fn in found - expected]
        missing = [f"{type(m).__name__}.{fn.__name__}" for m, fn in expected - found]
        raise PruningError(f"{name}: the torch-pruning group differs from the expected coupling "
                           f"(unexpected: {extra}; missing: {missing}); refusing to prune it")


# ----- importance --------------------------------------------------------------------------------------------------


def group_importance(criterion: Criterion) -> tp.importance.Importance:
    """torch-pruning's scorer for a DepGraph group."""
    if criterion == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance()
    if criterion == "random":
        return tp.importance.RandomImportance()
    raise PruningError(f"importance must be magnitude, taylor or random, got {criterion!r}")


def channel_scores(linear: nn.Linear, dim: int, criterion: Criterion) -> torch.Tensor:
    """Per-channel score `[channels along dim]` of a Linear weight `[out, in]` (dim 0 = outputs, 1 = inputs).

    magnitude: Σ w² over the other axis; taylor: Σ |w · ∂L/∂w|; random: uniform (the global torch RNG).
    """
    weight = linear.weight.detach().float()
    other = 1 - dim
    if criterion == "magnitude":
        return weight.pow(2).sum(other)
    if criterion == "taylor":
        if linear.weight.grad is None:
            raise PruningError("taylor importance needs gradients: run the calibration pass (calibrate) first")
        return (weight * linear.weight.grad.float()).abs().sum(other)
    if criterion == "random":
        return torch.rand(weight.shape[dim])
    raise PruningError(f"importance must be magnitude, taylor or random, got {criterion!r}")


def unit_scores(slices: list[tuple[nn.Linear, int, int]], units: int, criterion: Criterion) -> torch.Tensor:
    """Scores `[units]` of contiguous channel blocks: each (linear, dim, block width) adds its block sums."""
    total = torch.zeros(units)
    for linear, dim, width in slices:
        scores = channel_scores(linear, dim, criterion)
        total += scores[: units * width].reshape(units, width).sum(1)
    return total if criterion != "random" else torch.rand(units)


def lowest(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` lowest scores, ascending by index (ties broken by position)."""
    if count <= 0:
        return []
    return sorted(torch.argsort(scores, stable=True)[:count].tolist())


# ----- the parts ----------------------------------------------------------------------------------------------------


def llm_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a LLaMA / Gemma-2 causal LM (not peft-wrapped)."""
    architecture = llm.config.model_type
    if architecture not in LLM_ARCHITECTURES:
        raise PruningError(f"LLM architecture {architecture!r} is not supported; supported: {LLM_ARCHITECTURES}")
    if hasattr(llm, "get_base_model"):
        raise PruningError("the LLM is peft-wrapped; merge the LoRA adapters first (merge_lora)")
    return llm.model.layers


def widths(model) -> Widths:
    """Current widths of a `teacher.salmonn.Salmonn` student."""
    cfg = model.llm.config
    encoder = model.speech_encoder
    heads = encoder.layers[0].self_attn.num_heads
    beats = model.audio_encoder
    return Widths(llm_mlp=cfg.intermediate_size, llm_heads=cfg.num_attention_heads,
                  llm_kv_heads=cfg.num_key_value_heads, whisper_mlp=encoder.config.encoder_ffn_dim,
                  whisper_heads=heads, beats_mlp=beats.cfg.encoder_ffn_embed_dim if beats is not None else 0)


def prune_llm_mlp(llm: nn.Module, keep: int, criterion: Criterion, log: DepGraphLog) -> dict[int, list[int]]:
    """Keep `keep` intermediate channels in every LLM MLP; sets `config.intermediate_size`. Returns the removed
    channels per layer (original indices)."""
    layers = llm_layers(llm)
    architecture = llm.config.model_type
    removed = {}
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        total = mlp.gate_proj.out_features
        if keep >= total:
            continue
        example = torch.zeros(1, 2, mlp.gate_proj.in_features, dtype=mlp.gate_proj.weight.dtype)
        graph = depgraph(mlp, example, f"llm.layers.{i}.mlp", architecture, log)
        removed[i] = _prune_group(graph, mlp.gate_proj, total - keep, criterion, log,
                     {(mlp.gate_proj, tp.prune_linear_out_channels), (mlp.up_proj, tp.prune_linear_out_channels),
                      (mlp.down_proj, tp.prune_linear_in_channels)}, f"llm.layers.{i}.mlp")
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep
    llm.config.intermediate_size = min(keep, llm.config.intermediate_size)
    return removed


def _prune_group(graph, root: nn.Linear, remove: int, criterion: Criterion, log: DepGraphLog,
                 expected: set, name: str, unit: int = 1) -> list[int]:
    """Score `root`'s output channels through its DepGraph group and prune the `remove` lowest units of `unit`
    channels each (unit > 1: attention heads); returns the removed units."""
    with time_limit(log.timeout_s, f"pruning group of {name}"):
        group = graph.get_pruning_group(root, tp.prune_linear_out_channels, idxs=list(range(root.out_features)))
    expect_group(group, expected, name)
    scores = group_importance(criterion)(group)
    if criterion == "random" or unit > 1:
        units = root.out_features // unit
        scores = torch.rand(units) if criterion == "random" else scores.reshape(units, unit).sum(1)
    chosen = lowest(scores, remove)
    idxs = [u * unit + j for u in chosen for j in range(unit)]
    with time_limit(log.timeout_s, f"pruning group of {name}"):
        graph.get_pruning_group(root, tp.prune_linear_out_channels, idxs=idxs).prune()
    return chosen


def prune_llm_heads(llm: nn.Module, keep: int, mode: HeadMode, criterion: Criterion) -> dict[int, list[int]]:
    """GQA-aware head pruning of every LLM layer, without DepGraph; returns the removed query heads per layer.

    mode "kv_groups": keep `keep` key/value heads per layer; each removed KV head leaves with the query heads that
    read it (q rows and o columns of those heads, k/v rows of the KV head). mode "query_heads": keep `keep` query
    heads in every KV group (all KV heads stay; the query heads per group shrink alike). Head width, and with it
    the attention scale (Gemma-2: query_pre_attn_scalar), stays; config.head_dim is written out explicitly.
    """
    cfg = llm.config
    layers = llm_layers(llm)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    per_group = heads // kv
    removed = {}
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        hd = attn.head_dim
        if mode == "kv_groups":
            if keep >= kv:
                continue
            slices = [(attn.k_proj, 0, hd), (attn.v_proj, 0, hd), (attn.q_proj, 0, hd * per_group),
                      (attn.o_proj, 1, hd * per_group)]
            drop = lowest(unit_scores(slices, kv, criterion), kv - keep)
            q_heads = [g * per_group + j for g in drop for j in range(per_group)]
            kv_idxs = _channels(drop, hd)
        elif mode == "query_heads":
            if keep >= per_group:
                continue
            scores = unit_scores([(attn.q_proj, 0, hd), (attn.o_proj, 1, hd)], heads, criterion)
            q_heads = sorted(g * per_group + j for g in range(kv)
                             for j in lowest(scores[g * per_group:(g + 1) * per_group], per_group - keep))
            kv_idxs = []
        else:
            raise PruningError(f"llm head mode must be kv_groups or query_heads, got {mode!r}")
        q_idxs = _channels(q_heads, hd)
        tp.prune_linear_out_channels(attn.q_proj, q_idxs)
        tp.prune_linear_in_channels(attn.o_proj, q_idxs)
        if kv_idxs:
            tp.prune_linear_out_channels(attn.k_proj, kv_idxs)
            tp.prune_linear_out_channels(attn.v_proj, kv_idxs)
        new_kv = attn.k_proj.out_features // hd
        attn.num_key_value_groups = (attn.q_proj.out_features // hd) // new_kv
        removed[i] = q_heads
    if removed:
        attn = layers[0].self_attn
        cfg.head_dim = attn.head_dim  # explicit: hidden_size / heads would no longer be the head width
        cfg.num_attention_heads = attn.q_proj.out_features // attn.head_dim
        cfg.num_key_value_heads = attn.k_proj.out_features // attn.head_dim
    return removed


def _channels(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + j for h in heads for j in range(head_dim)]


def _layer_forward(layer, x):
    return layer(x, None)


def prune_whisper(encoder: nn.Module, keep_mlp: int, keep_heads: int, criterion: Criterion,
                  log: DepGraphLog) -> dict[str, dict[int, list[int]]]:
    """Keep `keep_mlp` fc1 channels and `keep_heads` heads in every Whisper encoder layer (DepGraph per layer).

    Sets `config.encoder_ffn_dim`, and for pruned heads `config.encoder_attention_heads_kept` (the head width
    d_model / encoder_attention_heads stays; `teacher.build.load_whisper_encoder` rebuilds such an encoder).
    Returns the removed fc1 channels and heads per layer.
    """
    heads = encoder.layers[0].self_attn.num_heads
    removed = {"mlp": {}, "heads": {}}
    for i, layer in enumerate(encoder.layers):
        name = f"speech_encoder.layers.{i}"
        d_model = layer.fc1.in_features
        if keep_mlp < layer.fc1.out_features or keep_heads < heads:
            example = torch.zeros(1, 4, d_model, dtype=layer.fc1.weight.dtype)
            graph = depgraph(layer, example, name, "whisper", log, forward_fn=_layer_forward)
        if keep_mlp < layer.fc1.out_features:
            removed["mlp"][i] = _prune_group(
                graph, layer.fc1, layer.fc1.out_features - keep_mlp, criterion, log,
                {(layer.fc1, tp.prune_linear_out_channels), (layer.fc2, tp.prune_linear_in_channels)}, f"{name}.fc1")
        if keep_heads < heads:
            attn = layer.self_attn
            removed["heads"][i] = _prune_group(graph, attn.q_proj, heads - keep_heads, criterion, log,
                         {(attn.q_proj, tp.prune_linear_out_channels), (attn.k_proj, tp.prune_linear_out_channels),
                          (attn.v_proj, tp.prune_linear_out_channels), (attn.out_proj, tp.prune_linear_in_channels)},
                         f"{name}.self_attn", unit=attn.head_dim)
            attn.num_heads = keep_heads
    encoder.config.encoder_ffn_dim = encoder.layers[0].fc1.out_features
    if keep_heads < heads:
        setattr(encoder.config, HEADS_KEPT, keep_heads)
    return removed


def prune_beats_mlp(beats: nn.Module, keep: int, criterion: Criterion, log: DepGraphLog) -> dict[int, list[int]]:
    """Keep `keep` fc1 channels in every BEATs layer (DepGraph per layer); sets `cfg.encoder_ffn_embed_dim`.
    Returns the removed channels per layer."""
    if beats.cfg.activation_fn == "glu":
        raise PruningError("BEATs with activation_fn 'glu' (fc1 is a gated pair) is not supported by the MLP pruner")
    removed = {}
    for i, layer in enumerate(beats.encoder.layers):
        if keep >= layer.fc1.out_features:
            continue
        name = f"audio_encoder.encoder.layers.{i}"
        example = torch.zeros(1, 4, layer.fc1.in_features, dtype=layer.fc1.weight.dtype)
        graph = depgraph(layer, example, name, "beats", log)
        removed[i] = _prune_group(graph, layer.fc1, layer.fc1.out_features - keep, criterion, log,
                                  {(layer.fc1, tp.prune_linear_out_channels),
                                   (layer.fc2, tp.prune_linear_in_channels)}, f"{name}.fc1")
    beats.cfg.encoder_ffn_embed_dim = beats.encoder.layers[0].fc1.out_features
    return removed


def prune_to(model, target: Widths, criterion: Criterion, head_mode: HeadMode,
             log: DepGraphLog) -> dict[str, dict[int, list[int]]]:
    """Prune a Salmonn student in place down to `target` widths (parts already at or below a width are left alone).

    With "taylor", gradients must already sit on the weights (see `prune.structured.calibrate`). Parameters keep
    their `requires_grad` flags. Returns the removed units (original indices within each layer) per part:
    llm_mlp, llm_heads (query heads), whisper_mlp, whisper_heads, beats_mlp.
    """
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    scale = _embedding_scale(model.llm)
    removed = {"llm_mlp": prune_llm_mlp(model.llm, target.llm_mlp, criterion, log)}
    keep_heads = target.llm_kv_heads if head_mode == "kv_groups" else target.llm_heads // target.llm_kv_heads
    removed["llm_heads"] = prune_llm_heads(model.llm, keep_heads, head_mode, criterion)
    whisper = prune_whisper(model.speech_encoder, target.whisper_mlp, target.whisper_heads, criterion, log)
    removed.update(whisper_mlp=whisper["mlp"], whisper_heads=whisper["heads"], beats_mlp={})
    if model.audio_encoder is not None and target.beats_mlp:
        removed["beats_mlp"] = prune_beats_mlp(model.audio_encoder, target.beats_mlp, criterion, log)
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, True))
    check_embedding_scale(model.llm, scale)
    return removed


def _embedding_scale(llm: nn.Module) -> float | None:
    embed = llm.get_input_embeddings()
    scale = getattr(embed, "embed_scale", None)
    return float(scale) if scale is not None else None


def check_embedding_scale(llm: nn.Module, before: float | None) -> None:
    """Gemma-2 multiplies input embeddings by √hidden_size, recomputed from the config when the model is built;
    raise if the pruned model's scale (now, or as a reload would compute it) differs from `before`."""
    if before is None:
        return
    now = _embedding_scale(llm)
    rebuilt = float(torch.tensor(llm.config.hidden_size**0.5))
    if now != before or abs(rebuilt - before) > 1e-6 * before:
        raise PruningError(f"Gemma-2 embedding scale changed from {before} to {now} (reload: {rebuilt}); "
                           "the hidden size must not be pruned")
