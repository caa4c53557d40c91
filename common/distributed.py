"""How training runs on one process or several: the Accelerator (DDP, DeepSpeed ZeRO, fp16 on CUDA), DeepSpeed's
config filled from the job, a frozen teacher beside the trained model, ZeRO-3's sharded parameters, a sampler
split across processes, and loss terms averaged over them. `common.training.fit` and the recipes use these.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from torch import nn

from common.training_config import LoopConfig, OptimConfig


def uses_deepspeed() -> bool:
    """Whether the launcher asked for DeepSpeed (`accelerate launch` with a DeepSpeed config sets this)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(loop: LoopConfig):
    """The Accelerator for a training job: one process, DDP or DeepSpeed, as the launcher set it up.

    fp16/bf16 only on CUDA (a CPU trains in fp32). DDP looks for parameters a step did not use (training stages
    freeze parts; BEATs' tagging head never runs). Without CUDA the processes talk over gloo, DeepSpeed included
    (with `DS_ACCELERATOR=cpu`), which is how the tests run them.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    deepspeed = uses_deepspeed()
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    if deepspeed and not cuda:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(mixed_precision=loop.precision if cuda and loop.precision != "fp32" else "no",
                       cpu=not cuda and not deepspeed, kwargs_handlers=handlers)


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def fill_deepspeed_config(config: dict, loop: LoopConfig, optim: OptimConfig, where: str = "the DeepSpeed config"):
    """Fill a DeepSpeed config's "auto" batch, accumulation and clipping from the job's loop and optim sections.

    A number in the JSON must agree with the job (one source of truth for the global batch); a mismatch stops
    the run naming the file (`where`), the key, both values and the fix. Changes `config` in place.
    """
    wanted = {"train_micro_batch_size_per_gpu": loop.batch_size, "gradient_accumulation_steps": loop.grad_accum,
              "gradient_clipping": optim.grad_clip}
    for key, value in wanted.items():
        current = config.get(key, "auto")
        if current == "auto":
            config[key] = value
        elif float(current) != float(value):
            raise ValueError(f"{where}: {key} is {current} but the job says {value} (loop.batch_size, "
                             "loop.grad_accum, optim.grad_clip); set it to \"auto\" in the JSON or change the job")
    if "optimizer" in config or "scheduler" in config:
        raise ValueError(f"{where}: remove 'optimizer' and 'scheduler': fit() brings its own AdamW and schedule "
                         "(torch's AdamW; DeepSpeed's fused Adam would JIT-compile for minutes)")


def configure_deepspeed(accelerator, loop: LoopConfig, optim: OptimConfig) -> None:
    """`fill_deepspeed_config` on the config the launcher gave accelerate."""
    where = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the DeepSpeed config")
    fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, loop, optim, where)


def prepare_frozen(model: nn.Module, accelerator, loop: LoopConfig):
    """Ready a frozen model that only runs forward passes beside the one being trained (a KD teacher).

    No gradients, no optimizer state and no DDP wrapper. Under DeepSpeed it gets an inference-only engine, as
    trl's `prepare_deepspeed` and accelerate's multi-model guide do: under ZeRO-3 its parameters are sharded
    across ranks like the student's and gathered layer by layer in each forward; under ZeRO-0/1/2 every rank holds
    a full fp16 copy. Without DeepSpeed it moves to this process's device, in fp16 on CUDA when training in fp16
    (a V100 has no bf16). Returns `(module to call, engine or None)`; keep the engine alive beside the module.
    """
    model.requires_grad_(False).eval()
    fp16 = torch.cuda.is_available() and loop.precision == "fp16"
    if not is_deepspeed(accelerator):
        model.to(accelerator.device)
        if fp16:
            model.half()
        return model, None
    import deepspeed

    student = accelerator.state.deepspeed_plugin.deepspeed_config
    stage = int(student.get("zero_optimization", {}).get("stage", 0))
    zero = copy.deepcopy(student.get("zero_optimization", {})) if stage == 3 else {"stage": 0}
    for key in ("offload_optimizer", "stage3_gather_16bit_weights_on_model_save"):
        zero.pop(key, None)
    config = {"train_micro_batch_size_per_gpu": loop.batch_size, "gradient_accumulation_steps": 1,
              "fp16": {"enabled": fp16}, "bf16": {"enabled": False}, "zero_optimization": zero}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine.module, engine


@contextlib.contextmanager
def whole_models(accelerator):
    """Inside, transformers builds models whole even under ZeRO-3; DeepSpeed shards them later, at `prepare`.

    accelerate registers the ZeRO-3 config with transformers, which then builds every model already sharded
    (`deepspeed.zero.Init`): a collective that one process alone cannot run, and shards that a student built by
    copying teacher weights cannot read. The job's `zero3_init_flag: false` asks for whole models; this keeps it.
    """
    if zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(accelerator.state.deepspeed_plugin.dschf)


@contextlib.contextmanager
def full_parameters(module: nn.Module):
    """Inside, every parameter of `module` is whole on every rank (ZeRO-3 gathers them; otherwise a no-op).

    Every rank must enter it together under ZeRO-3.
    """
    params = list(module.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def shard_sampler(sampler, accelerator):
    """Give each process its share of the batches: a sampler with `num_replicas`/`rank` (DurationBucketSampler)
    left at one replica is set to this process's rank; one already sharded must match the processes."""
    processes, rank = accelerator.num_processes, accelerator.process_index
    if processes == 1:
        return sampler
    replicas = getattr(sampler, "num_replicas", None)
    if replicas is None:
        raise ValueError(f"{type(sampler).__name__} cannot be split across {processes} processes: give it "
                         "num_replicas and rank attributes (as common.dataset.DurationBucketSampler has)")
    if replicas == 1:
        sampler.num_replicas, sampler.rank = processes, rank
    elif (replicas, sampler.rank) != (processes, rank):
        raise ValueError(f"the sampler is sharded for rank {sampler.rank} of {replicas}, but this is rank {rank} of "
                         f"{processes}; leave num_replicas at 1 and fit() shards it")
    return sampler


def reduce_terms(accelerator, terms: dict[str, float], tokens: int) -> tuple[dict[str, float], int]:
    """Means of the loss terms and the sum of target tokens over all processes (one all-reduce)."""
    if accelerator.num_processes == 1:
        return terms, tokens
    names = sorted(terms)
    values = torch.tensor([terms[n] for n in names] + [float(tokens)], dtype=torch.float64, device=accelerator.device)
    values = accelerator.reduce(values, reduction="sum").cpu()
    return {n: float(values[i]) / accelerator.num_processes for i, n in enumerate(names)}, int(values[-1])
