"""Export: the LLM reloads with AutoModelForCausalLM.from_pretrained, the whole student with load_export, both
reproducing the exported (pruned) student exactly; fp16 export; the model card carries the measured numbers."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny_student import training_batch, write_student_folder
from transformers import AutoModelForCausalLM

from common.results import build_results, write_results
from prune.export import BRIDGE, ENCODERS, load_export
from prune.export import main as export_main
from prune.structured import main as prune_main
from student.build import load_student_folder

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    folder = write_student_folder(root)
    args = [f"model={folder}", f"output_dir={root / 'pruned'}", f"log_dir={root / 'runs'}", "ratios.llm_mlp=0.5",
            "ratios.llm_heads=0.5", "ratios.whisper_heads=0.25", "ratios.beats_mlp=0.5"]
    assert prune_main(args) == 0
    return root, root / "pruned" / "model"


def results_file(path):
    metrics = {"wer": 0.25, "cer": 0.1, "cider_d": 0.4, "params": 1234, "weight_bytes": 4936, "peak_memory_mb": 1.5,
               "ttft_ms": 3.25, "tpot_ms": 0.5}
    return write_results(path, build_results(metrics, {"efficiency": {"protocol": "careful"}},
                                             {"spice": "no CoreNLP jars", "spider": "needs spice"}, model="pruned"))


def test_export_reloads_identically_and_documents_itself(pruned, tmp_path):
    root, folder = pruned
    results = results_file(tmp_path / "eval" / "pruned" / "results.json")
    (tmp_path / "eval" / "config.yaml").write_text("job: evaluation.run\n")
    out = tmp_path / "export"
    assert export_main([f"model={folder}", f"output_dir={out}", f"results={results}", "name=tiny student"]) == 0
    student = load_student_folder(folder)
    llm = AutoModelForCausalLM.from_pretrained(out / "llm").eval()
    assert (llm.config.intermediate_size, llm.config.num_attention_heads, llm.config.num_key_value_heads) == (32, 2, 1)
    ids = student.tokenizer("the dog runs", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(llm(input_ids=ids).logits, student.llm(input_ids=ids).logits)
    again = load_export(out)
    batch = training_batch(student)
    with torch.no_grad():
        a, b = again.encode_audio(batch), student.encode_audio(batch)
        assert torch.equal(a, b)
        assert torch.equal(again.prefill(a, batch["prompts"])[0], student.prefill(b, batch["prompts"])[0])
    assert again.speech_encoder.layers[0].self_attn.num_heads == 3
    with safe_open(str(out / ENCODERS), "pt") as handle:
        assert all(k.startswith(("speech_encoder.", "audio_encoder.")) for k in handle.keys())
    with safe_open(str(out / BRIDGE), "pt") as handle:
        assert {k.split(".")[0] for k in handle.keys()} == {"qformer", "ln_speech", "ln_audio", "projector"}
    card = (out / "README.md").read_text()
    assert "0.2500" in card or "0.25" in card
    assert f"python -m evaluation.run --config {tmp_path / 'eval' / 'config.yaml'}" in card
    assert f"python -m prune.structured --config {folder / 'config.yaml'}" in card
    assert f"python -m prune.export --config {out / 'config.yaml'}" in card
    assert "from_pretrained` reproduces the logits exactly: True" in card


def test_fp16_export(pruned, tmp_path):
    _, folder = pruned
    out = tmp_path / "fp16"
    assert export_main([f"model={folder}", f"output_dir={out}", "dtype=float16"]) == 0
    assert json.loads((out / "llm" / "config.json").read_text())["dtype"] == "float16"
    with safe_open(str(out / ENCODERS), "pt") as handle:
        assert handle.get_tensor("speech_encoder.layers.0.fc1.weight").dtype == torch.float16
    again = load_export(out)
    assert again.llm_dtype == torch.float16 and next(again.speech_encoder.parameters()).dtype == torch.float16
    assert "No evaluation results were given" in (out / "README.md").read_text()


def test_export_refuses_bad_inputs(pruned, tmp_path):
    _, folder = pruned
    with pytest.raises(SystemExit, match="results"):
        export_main([f"model={folder}", f"output_dir={tmp_path / 'x'}", f"results={tmp_path / 'none.json'}"])
    with pytest.raises(SystemExit, match="not a student folder"):
        export_main([f"model={tmp_path}", f"output_dir={tmp_path / 'y'}"])
