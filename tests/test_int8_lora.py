"""LoRA over an int8-frozen base (`model.llm.int8_frozen`, `model.whisper.int8_frozen`, `common.int8_frozen`): a tiny
SALMONN in the official layouts trains with the shared loop; only adapters and glue move, the int8 weights do not."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from peft.tuners.lora.torchao import TorchaoLoraLinear
from tiny_salmonn import tiny_batch, write_official_layout

from common.dataset import AudioTextCollator
from common.int8_frozen import is_int8, weight_bytes
from common.tracking import MetricLogger, read_metrics
from common.training import LoopConfig, OptimConfig, fit, seed_everything
from prune.skeleton import merge_lora
from teacher.build import build_salmonn
from teacher.checkpoint import load_model_folder, save_model_folder

TEXTS = ["the cat sat on the mat", "hello world", "the dog runs", "a high tone followed by three short beeps"]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8lora")
    return root, write_official_layout(root / "official")


def int8_config(cfg, whisper: bool = True):
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, int8_frozen=True),
                               whisper=dataclasses.replace(cfg.whisper, int8_frozen=whisper))


class FixedBatches:
    """Batches of indices `[[0, 1], [2, 3]]` every epoch (the loop's sampler interface)."""

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter([[0, 1], [2, 3]])


def make_items() -> list[dict]:
    items = []
    for i, text in enumerate(TEXTS):
        batch = tiny_batch(batch_size=1, seed=i)
        items.append({"mel": batch["mel"][0], "fbank": batch["fbank"][0],
                      "fbank_padding_mask": batch["fbank_padding_mask"][0], "prompt": "Recognize the speech.",
                      "text": text})
    return items


def collator(tokenizer):
    targets = AudioTextCollator(tokenizer)

    def collate(items: list[dict]) -> dict:
        batch = {key: torch.stack([item[key] for item in items]) for key in ("mel", "fbank", "fbank_padding_mask")}
        batch["prompts"] = [item["prompt"] for item in items]
        batch["target_ids"], batch["labels"] = targets.tokenize_targets([item["text"] for item in items])
        return batch

    return collate


def int8_weights(model) -> dict[str, torch.Tensor]:
    """The int8 values and scales of every quantized weight, copied."""
    out = {}
    for name, p in model.named_parameters():
        if is_int8(p):
            out[name + ".qdata"] = p.qdata.clone()
            out[name + ".scale"] = p.scale.clone()
    return out


def train(model, tmp_path, steps: int = 12) -> list[float]:
    """`steps` optimizer steps of the shared loop (CE on the targets); returns the logged training losses."""
    loop = LoopConfig(max_steps=steps, batch_size=2, log_every=1, eval_every=1000, save_every=1000, resume=False)
    with MetricLogger(tmp_path / "logs", backends=("jsonl",), owner=tmp_path) as logger:
        fit(model, make_items(), FixedBatches(), collator(model.tokenizer), lambda m, b: {"loss": m(b).loss}, loop,
            OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.0), tmp_path, logger)
    return [r["train/loss"] for r in read_metrics(tmp_path / "logs") if "train/loss" in r]


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_lora_trains_over_int8_frozen_llm_and_whisper_with_the_shared_loop(official, tmp_path):
    _, cfg = official
    # Adapters on every linear layer of the LLM (the tiny checkpoint's r=4 q/v ones are not loaded), so that they
    # alone can bring the loss down; everything else is frozen below, so the loss falls only if gradients cross the
    # int8 matmuls into the adapters.
    cfg = dataclasses.replace(int8_config(cfg), checkpoint="",
                              lora=dataclasses.replace(cfg.lora, r=8, alpha=16, target_modules=ALL_LINEAR))
    seed_everything(0)
    model, _ = build_salmonn(cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(p.requires_grad and ".lora_" in name)
    lora_layers = [m for m in model.llm.modules() if isinstance(m, TorchaoLoraLinear)]
    assert len(lora_layers) == 7 * 2  # every linear layer of the 2 LLM layers, wrapped by peft's torchao LoRA
    assert all(is_int8(m.get_base_layer().weight) for m in lora_layers)
    assert all(is_int8(m.weight) for m in model.speech_encoder.modules() if isinstance(m, torch.nn.Linear))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and model.get_parameter(n).dtype == torch.float32 for n in trainable)
    frozen = int8_weights(model)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    assert len(frozen) > 0 and len(adapters) == 2 * len(lora_layers)

    losses = train(model, tmp_path, steps=40)

    # The two batches alternate, so compare means over an epoch. These 40 steps bring the loss from 4.80 (about
    # ln 120, the tiny vocabulary) to 4.28; adapters that get no gradient would leave it where it started.
    assert len(losses) == 40 and sum(losses[-2:]) < 0.95 * sum(losses[:2]), losses
    after = int8_weights(model)
    assert after.keys() == frozen.keys()
    assert all(torch.equal(after[k], frozen[k]) for k in frozen)  # bit-identical int8 values and scales
    moved = {n for n, p in model.named_parameters() if ".lora_" in n and not torch.equal(p.detach(), adapters[n])}
    assert moved == set(adapters)  # every adapter, A and B, in the LLM's first layer as in its last


def test_int8_frozen_weights_take_about_a_quarter_of_fp32(official):
    _, cfg = official
    model, _ = build_salmonn(int8_config(cfg))
    fp32, _ = build_salmonn(cfg)
    for part, reference in ((model.llm, fp32.llm), (model.speech_encoder, fp32.speech_encoder)):
        sizes = weight_bytes(part)
        # int8 values (1 byte) + one fp32 scale per output row: 1/4 + 1/in_features of fp32; the tiny model's
        # in_features are 32 and 64, so between 0.25 and 0.25 + 1/32.
        assert 0.25 < sizes["int8"] / sizes["int8_as_fp32"] <= 0.25 + 1 / 32 + 1e-9
        reference_sizes = weight_bytes(reference)
        assert reference_sizes["int8"] == 0
        # the quantized weights are exactly the reference's linear weights (embeddings and norms stay as they were)
        assert sizes["int8_as_fp32"] + sizes["other"] == reference_sizes["other"]


def test_a_saved_int8_model_folder_holds_plain_weights_and_loads_back_int8(official, tmp_path):
    _, cfg = official
    cfg = int8_config(cfg)
    seed_everything(0)
    model, _ = build_salmonn(cfg)
    with torch.no_grad():  # LoRA B starts at zero; make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.eval()
    save_model_folder(model, cfg, tmp_path / "model")
    from safetensors.torch import load_file

    llm_file = load_file(str(tmp_path / "model" / "llm" / "model.safetensors"))
    q_proj = model.llm.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer().weight
    assert llm_file["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    assert torch.equal(llm_file["model.layers.0.self_attn.q_proj.weight"], q_proj.dequantize())
    again = load_model_folder(tmp_path / "model")
    # the folder loads back over the very int8 values it was trained over (scales to float rounding: 127·s / 127)
    reloaded = int8_weights(again)
    for name, tensor in int8_weights(model).items():
        if name.endswith(".qdata"):
            assert torch.equal(reloaded[name], tensor), name
        else:
            torch.testing.assert_close(reloaded[name], tensor, rtol=2e-7, atol=0)
    batch = tiny_batch()
    batch["target_ids"], batch["labels"] = AudioTextCollator(model.tokenizer).tokenize_targets(["the cat", "hello"])
    with torch.no_grad():
        torch.testing.assert_close(again(batch).logits, model(batch).logits, rtol=1e-5, atol=1e-6)


def test_merge_lora_dequantizes_the_int8_base_and_keeps_the_function(official):
    _, cfg = official
    cfg = int8_config(cfg)
    seed_everything(0)
    model, _ = build_salmonn(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.eval()
    batch = tiny_batch()
    batch["target_ids"], batch["labels"] = AudioTextCollator(model.tokenizer).tokenize_targets(["the cat", "hello"])
    with torch.no_grad():
        want = model(batch).logits
    merged_cfg = merge_lora(model, cfg)
    assert not merged_cfg.llm.int8_frozen and not merged_cfg.whisper.int8_frozen and not merged_cfg.lora.enabled
    assert not any(is_int8(p) for p in model.parameters())
    assert not any(type(m).__name__ == "Int8FrozenLinear" for m in model.modules())  # plain nn.Linear again
    with torch.no_grad():
        got = model(batch).logits
    # The int8 matmul (x @ q.T · scale) and the dequantized one (x @ (q · scale).T) round differently in fp32.
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_an_int8_part_that_would_train_is_a_config_error(official):
    _, cfg = official
    no_lora = int8_config(cfg, whisper=False)
    no_lora = dataclasses.replace(no_lora, lora=dataclasses.replace(cfg.lora, enabled=False),
                                  llm=dataclasses.replace(no_lora.llm, freeze=False))
    with pytest.raises(SystemExit, match=r"model\.llm\.int8_frozen: true.*Fix: set model\.lora\.enabled: true"):
        build_salmonn(no_lora)
    training_whisper = dataclasses.replace(int8_config(cfg), whisper=dataclasses.replace(
        cfg.whisper, int8_frozen=True, freeze=False))
    with pytest.raises(SystemExit, match=r"model\.whisper\.int8_frozen: true.*model\.whisper\.freeze: true"):
        build_salmonn(training_whisper)



def test_the_bench_compares_both_bases_on_the_same_seeded_model(tmp_path, capsys):
    from evaluation.int8_lora_bench import main

    args = ["--hidden", "64", "--layers", "2", "--whisper-dim", "64", "--steps", "4", "--warmup", "1",
            "--train-clips", "8", "--held-out-clips", "4", "--out", str(tmp_path / "bench.json")]
    assert main(args) == 0
    assert "| fp32 |" in capsys.readouterr().out
    result = json.loads((tmp_path / "bench.json").read_text())
    fp32, int8 = result["rows"]
    assert (fp32["base"], int8["base"]) == ("fp32", "int8")
    # 1 byte per weight + one fp32 scale per row of 64 to 256 inputs (4/in bytes more per weight): ≤ 1/4 + 1/64
    assert 0.25 < result["ratios"]["frozen_linear"] < 0.25 + 1 / 64
    assert int8["weights_mb"] < fp32["weights_mb"]
    # the same seeded weights: before any step the int8 base changes the logits only by its rounding (one step of a
    # 255-level grid per weight), not like another model would (relative error of order 1)
    assert 0 < result["int8_logit_error_before_training"] < 0.05
    assert abs(int8["first_loss"] - fp32["first_loss"]) < 0.01 * fp32["first_loss"]
    assert all(math.isfinite(r[k]) for r in (fp32, int8) for k in ("train_loss_last", "held_out_loss", "step_s"))


def test_an_online_teacher_in_int8_keeps_its_outputs_to_its_rounding(official, tmp_path):
    from distill.distiller import int8_teacher

    _, cfg = official
    seed_everything(0)
    model, _ = build_salmonn(cfg)
    save_model_folder(model, cfg, tmp_path / "teacher")
    teacher = load_model_folder(tmp_path / "teacher")
    batch = tiny_batch()
    batch["target_ids"], batch["labels"] = AudioTextCollator(teacher.tokenizer).tokenize_targets(["the cat", "hi"])
    with torch.no_grad():
        want = teacher(batch).logits
        int8_teacher(teacher)
        got = teacher(batch).logits
    assert not hasattr(teacher.llm, "merge_and_unload")  # LoRA merged
    assert all(is_int8(m.weight) for part in (teacher.llm, teacher.speech_encoder) for m in part.modules()
               if isinstance(m, torch.nn.Linear))
    # one step of a 255-level grid per weight: a small fraction of the logits' spread, and not zero
    assert 0 < (got - want).abs().max() < 0.02 * want.abs().max()


def test_a_student_trains_lora_over_its_int8_llm_and_gets_the_int8_teachers_whisper_in_fp32(official, tmp_path):
    from tiny_salmonn import TEXTS

    from common.bpe import train_bpe
    from student.build import StudentConfig, build_student
    from teacher.build import LLMConfig, LoraSpec

    _, cfg = official
    cfg = int8_config(cfg)
    seed_everything(0)
    teacher, _ = build_salmonn(cfg)
    save_model_folder(teacher, cfg, tmp_path / "teacher")
    train_bpe(TEXTS, 150, "bytelevel").save_pretrained(tmp_path / "student_tok")
    llm = LLMConfig(tokenizer=str(tmp_path / "student_tok"), architecture="gemma2", hidden_size=32,
                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=8, tie_word_embeddings=True, freeze=True, int8_frozen=True)
    student_cfg = StudentConfig(whisper_layers=1, llm=llm, lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    student, _ = build_student(student_cfg, tmp_path / "teacher")
    core = student.llm.get_base_model()
    assert not is_int8(core.get_input_embeddings().weight) and core.lm_head.weight is core.get_input_embeddings().weight
    assert all(is_int8(m.weight) for name, m in core.named_modules()
               if isinstance(m, torch.nn.Linear) and ".lora_" not in name and name != "lm_head")
    assert sum(isinstance(m, TorchaoLoraLinear) for m in core.modules()) == 2 * 2
    # the student's Whisper trains: the teacher's last layer arrives dequantized, as plain fp32 parameters
    last = teacher.speech_encoder.layers[-1].fc1.weight
    assert not any(is_int8(p) for p in student.speech_encoder.parameters())
    assert torch.equal(student.speech_encoder.layers[0].fc1.weight, last.dequantize())

    frozen_llm = dataclasses.replace(student_cfg, lora=LoraSpec(enabled=False), llm=dataclasses.replace(llm,
                                                                                                     freeze=False))
    with pytest.raises(SystemExit, match=r"student\.llm\.int8_frozen: true, but student\.llm\.freeze is false"):
        build_student(frozen_llm, tmp_path / "teacher")


def saved_for_backward_bytes(model, batch) -> int:
    """Bytes of the tensors autograd saves for backward in one forward that are not the model's own parameters
    (a saved parameter is a reference, not new memory)."""
    owned = {p.data_ptr() for p in model.parameters() if not is_int8(p)}
    total = 0

    def pack(tensor):
        nonlocal total
        if not is_int8(tensor) and tensor.data_ptr() not in owned:
            total += tensor.numel() * tensor.element_size()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(batch).loss.backward()
    return total


def test_backward_through_int8_layers_keeps_no_float_copy_of_them_and_gives_the_dequantized_gradients(official):
    _, cfg = official
    cfg = dataclasses.replace(cfg, checkpoint="")
    seed_everything(0)
    int8, _ = build_salmonn(int8_config(cfg, whisper=False))
    seed_everything(0)
    plain_model, _ = build_salmonn(cfg)
    with torch.no_grad():  # the fp32 model over exactly the int8 model's (dequantized) weights
        for (name, p), (_, q) in zip(int8.named_parameters(), plain_model.named_parameters(), strict=True):
            q.copy_(p.dequantize() if is_int8(p) else p)
            if "lora_B" in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
                q.copy_(p)
    batch = tiny_batch()
    batch["target_ids"], batch["labels"] = AudioTextCollator(int8.tokenizer).tokenize_targets(["the cat", "hello"])
    int8_saved = saved_for_backward_bytes(int8, batch)
    plain_saved = saved_for_backward_bytes(plain_model, batch)
    frozen_fp32 = weight_bytes(int8.llm)["int8_as_fp32"]
    # Both keep the same activations; torchao's own path would add a float copy of every int8 weight (+100 % of
    # frozen_fp32). The int8 forward's rounding-free extras (an fp32 scale row per layer) stay far below 10 %.
    assert abs(int8_saved - plain_saved) < 0.1 * frozen_fp32, (int8_saved, plain_saved, frozen_fp32)
    grads = {n: p.grad for n, p in int8.named_parameters() if p.grad is not None}
    assert any(".lora_A" in n for n in grads)
    for name, p in plain_model.named_parameters():
        if name in grads:
            # (dL/dy · scale) · q against dL/dy · (scale · q): the same product, summed in another order in fp32
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)
