"""The distill recipe on several processes: DDP and DeepSpeed ZeRO-2 over gloo on this CPU, launched through our own
accelerate configs, against one process that sees the same global batch.

Two processes with `loop.batch_size=2` take alternate batches of the sampler; one process with `loop.batch_size=2,
loop.grad_accum=2` takes the same two batches per step. Both average the two batch means, so every step's loss,
gradient norm and the trained weights must agree up to float32 reduction order: two ranks sum gradients (and the
clipping norm) in another order than one process, and DeepSpeed's AdamW steps one flat partition rather than each
tensor, so weights after a step differ in the last bits of each update. Observed: ~1e-7 relative on one CPU, 1.6e-5
on another (AMD EPYC, no AVX-512) for `train/feature` at step 3 (below).

Tolerances: 1e-5 relative for every logged term, and for the feature term also 1e-6 absolute. That term is
MSE + (1 − cos) of O(1) Q-Former vectors that nearly agree (~1e-3), a small difference of O(1) float32 numbers: its
absolute resolution is that of the O(1) operands (float32 epsilon 1.2e-7, a few roundings in the reductions), not
of its own size, so a last-bit change of the weights moves it by ~1e-8 absolute, which is 1e-5 relative of 1e-3.
A real divergence (a wrong batch, a lost gradient) changes the weights by the size of an update, not its last bits,
and the other terms, held to 1e-5 relative, see it too.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from tiny_salmonn import write_teacher_folder

from common.tracking import read_metrics
from distill.train import main as distill_main
from teacher.cache import main as cache_main

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5
FEATURE_ATOL = 1e-6  # see the module docstring: the feature term's absolute float32 resolution

# DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce kernel (about 70 s on a cold cache) when it
# initialises; gloo does the same collectives, so the tests leave the kernel out.
DEEPSPEED_WORKER = """import sys
import deepspeed.ops
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
from distill.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny teacher folder, 16 clips (8 batches of 2) and the teacher cache of them."""
    root = tmp_path_factory.mktemp("ddp")
    write_teacher_folder(root)
    rng = np.random.default_rng(0)
    texts = ["the cat sat on the mat", "hello world", "the dog runs", "a high tone followed by three short beeps"]
    entries = []
    for i, text in enumerate(texts * 4):
        sf.write(root / f"{i}.wav", (0.3 * rng.standard_normal(8000 + 500 * i)).astype(np.float32), 16000)
        entries.append({"path": f"{i}.wav", "text": text, "task": "asr" if i % 4 < 3 else "audiocaption"})
    (root / "train.json").write_text(json.dumps({"annotation": entries}))
    (root / "valid.json").write_text(json.dumps({"annotation": entries[:2]}))
    cache_main([f"teacher_folder={root / 'teacher'}", f"data.train=[{root / 'train.json'}]",
                "features.whisper_chunk_seconds=2", "shard_size=8", "k=8", f"output_dir={root / 'cache'}"])
    return root


def recipe_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"teacher_folder={root / 'teacher'}", f"kd.cache_dir={root / 'cache'}", "kd.feature_weight=1.0",
        f"data.train=[{root / 'train.json'}]", f"data.valid=[{root / 'valid.json'}]", "data.bucket_pool_batches=1",
        "features.whisper_chunk_seconds=2", "student.whisper_layers=1", "student.token_pruning.keep_ratio=0.5",
        "student.token_pruning.prune_after_layers=[0]", f"student.llm.tokenizer={out / 'student_tok'}",
        "student.llm.hidden_size=24", "student.llm.intermediate_size=48", "student.llm.num_hidden_layers=1",
        "student.llm.num_attention_heads=2", "student.llm.num_key_value_heads=1", "student.llm.head_dim=12",
        "student.llm.freeze=false", "student.tokenizer.vocab_size=150",
        "loop.batch_size=2", "loop.max_steps=3", "loop.log_every=1", "loop.eval_every=100", "loop.save_every=2",
        "loop.keep_last=5", "optim.warmup_steps=1", "validation.max_clips_per_task=1", "validation.max_new_tokens=2",
        f"output_dir={out}", f"log_dir={out / 'runs'}", *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(accelerate_config: str, script: list[str], args: list[str], env: dict | None = None) -> None:
    """`accelerate launch --config_file configs/accelerate/<config> --num_processes 2 ...` from the repo root."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               f"configs/accelerate/{accelerate_config}", "--num_processes", "2", "--main_process_port",
               str(free_port()), *script, *args]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def train_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "runs") if "train/loss" in r]


def assert_same_run(records: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for got, want in zip(records, reference, strict=True):
        for key in ("train/loss", "train/ce", "train/kd", "train/feature", "train/grad_norm", "train/lr"):
            atol = FEATURE_ATOL if key == "train/feature" else 0.0
            assert got[key] == pytest.approx(want[key], rel=RTOL, abs=atol), (got["step"], key)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "trainable.safetensors")), load_file(str(b / "trainable.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=RTOL, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """The reference: one process, two batches of 2 accumulated per step (global batch 4)."""
    out = tmp_path_factory.mktemp("one")
    assert distill_main(recipe_args(data, out, "loop.grad_accum=2")) == 0
    return out


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(data, one_process, tmp_path):
    out = tmp_path / "ddp"
    defaults = tmp_path / "defaults.yaml"  # the command line wants a --config: one that keeps every default
    defaults.write_text("job: distill.train\n")
    launch("ddp.yaml", ["-m", "distill.train", "--config", str(defaults)], recipe_args(data, out, "loop.grad_accum=1"))
    records = train_records(out)
    assert len(records) == 3  # the main process logs, once per step
    assert_same_run(records, train_records(one_process))
    step = out / "checkpoints" / "step_0000003"
    assert {"rng_rank0.pt", "rng_rank1.pt", "training_state.pt", "state.json"} <= {p.name for p in step.iterdir()}
    assert json.loads((step / "state.json").read_text())["batch_in_epoch"] == 3  # each rank's 3rd of its 4 batches
    assert_same_weights(step, one_process / "checkpoints" / "step_0000003")
    assert (out / "model" / "DONE").is_file()


@pytest.fixture(scope="module")
def zero2(data, tmp_path_factory):
    """Two DeepSpeed ZeRO-2 ranks (torch AdamW as the client optimizer), the same global batch as `one_process`."""
    root = tmp_path_factory.mktemp("zero2")
    worker = root / "worker.py"
    worker.write_text(DEEPSPEED_WORKER)
    out = root / "run"
    launch("deepspeed_zero2.yaml", [str(worker)], recipe_args(data, out, "loop.grad_accum=1"),
           {"DS_ACCELERATOR": "cpu"})
    return worker, out


@pytest.mark.slow
def test_deepspeed_zero2_two_ranks_match_one_process(zero2, one_process):
    _, out = zero2
    assert_same_run(train_records(out), train_records(one_process))
    engine = out / "checkpoints" / "step_0000002" / "deepspeed" / "engine"
    assert sorted(p.name for p in engine.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert_same_weights(out / "checkpoints" / "step_0000003", one_process / "checkpoints" / "step_0000003")
    assert (out / "model" / "DONE").is_file()


@pytest.mark.slow
def test_deepspeed_zero2_resumes_a_step_exactly(zero2, data, one_process, tmp_path):
    """From step 2's checkpoint (engine partitions, schedule, RNG, data position) step 3 comes out the same."""
    worker, out = zero2
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step_0000002", resumed / "checkpoints" / "step_0000002")
    launch("deepspeed_zero2.yaml", [str(worker)],
           recipe_args(data, resumed, "loop.grad_accum=1", f"student.llm.tokenizer={out / 'student_tok'}"),
           {"DS_ACCELERATOR": "cpu"})
    records = train_records(resumed)
    assert [r["step"] for r in records] == [3]
    assert_same_run(records, train_records(one_process)[2:])
