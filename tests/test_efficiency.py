"""Tests of the model interface, the efficiency harness and results.json.

Timings are never asserted on (this CPU is shared and noisy): only their structure, counts and the
arithmetic that turns them into statistics and ratios.
"""

import json
import math
import time

import pytest
import torch
from standins import StandInConfig, StandInModel, make_clip
from torch import nn
from torchao.quantization import Int8WeightOnlyConfig, quantize_

from common.model import AudioLanguageModel, batch_size_of, concat_batches
from common.results import (
    METRIC_KEYS,
    build_results,
    efficiency_metrics,
    format_summary,
    load_results,
    validate_results,
    write_results,
)
from common.sizes import count_parameters, tensor_bytes, weight_bytes
from evaluation.efficiency import (
    RATIO_KEYS,
    EfficiencyConfig,
    PeakMemoryMeter,
    compare,
    measure,
    summarize,
)

TEACHER_CONFIG = StandInConfig(encoder_layers=3, llm_dim=64, llm_layers=3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on 2 shared cores: a second intra-op thread mostly waits for the first, and made
    these tests 10× slower when the other core was busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class CountingStandIn(StandInModel):
    """Stand-in that logs its name on every `encode_audio` (one per latency run or `generate`)."""

    def __init__(self, name: str, log: list[str], config: StandInConfig | None = None) -> None:
        super().__init__(config)
        self.name = name
        self.log = log

    def encode_audio(self, batch):
        self.log.append(self.name)
        return super().encode_audio(batch)


def small_config(**overrides) -> EfficiencyConfig:
    fields = {"warmup_runs": 1, "timed_runs": 4, "decode_steps": 3, "throughput_batch_size": 2,
              "throughput_runs": 2, "max_new_tokens": 4, "bandwidth_seconds": 0.05}
    return EfficiencyConfig(**{**fields, **overrides})


# ---------------------------------------------------------------------------------------------------
# Parameters and weight bytes


class ToyModel(nn.Module):
    """Known sizes: speech 3·4+4 = 16; llm embedding 10·4 = 40 tied to its output layer; projector
    4·2+2 = 10, frozen; a loose parameter of 5 and a persistent buffer of 3 (other)."""

    def __init__(self) -> None:
        super().__init__()
        self.speech = nn.Linear(3, 4)
        self.llm = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
        self.llm[1].weight = self.llm[0].weight
        self.projector = nn.Linear(4, 2).requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(5))
        self.register_buffer("running", torch.zeros(3))
        self.register_buffer("recomputed", torch.zeros(100), persistent=False)

    def parts(self) -> dict[str, nn.Module]:
        return {"speech_encoder": self.speech, "qformer_projector": self.projector, "llm": self.llm}


def test_count_parameters_per_part_matches_hand_count():
    model = ToyModel()
    counts = count_parameters(model, model.parts())
    assert counts["per_part"] == {"speech_encoder": 16, "qformer_projector": 10, "llm": 40, "other": 5}
    assert counts["total"] == 16 + 10 + 40 + 5
    assert counts["trainable"] == 16 + 40 + 5


def test_count_parameters_rejects_a_part_outside_the_model():
    model = ToyModel()
    with pytest.raises(ValueError, match="not the model's"):
        count_parameters(model, {**model.parts(), "audio_encoder": nn.Linear(2, 2)})


def test_weight_bytes_fp32_and_fp16():
    model = ToyModel()
    # Tied weight once; the persistent buffer under other; the non-persistent buffer not stored.
    elements = {"speech_encoder": 16, "qformer_projector": 10, "llm": 40, "other": 5 + 3}
    assert weight_bytes(model, model.parts())["per_part"] == {k: 4 * n for k, n in elements.items()}
    half = model.half()
    assert weight_bytes(half, half.parts())["total"] == 2 * sum(elements.values())


def test_weight_bytes_of_torchao_int8_weights_count_inner_tensors():
    dims = [(64, 32), (32, 8)]  # (in, out)
    model = nn.Sequential(*(nn.Linear(i, o) for i, o in dims))
    assert weight_bytes(model, {})["total"] == sum(4 * (i * o + o) for i, o in dims)
    quantize_(model, Int8WeightOnlyConfig())
    # torchao 0.18 Int8Tensor, per-row: int8 data [out, in], fp32 scale [out, 1], int8 zero point
    # [out, 1]; the bias stays fp32.
    assert weight_bytes(model, {})["total"] == sum(i * o + o * (4 + 1) + 4 * o for i, o in dims)
    assert tensor_bytes(model[0].weight) == 64 * 32 + 32 * 5
    assert count_parameters(model, {})["total"] == sum(i * o + o for i, o in dims)


def test_quantized_standin_runs_and_shrinks():
    model = StandInModel()
    clip = make_clip()
    expected = model.generate(clip, ["transcribe"], max_new_tokens=6)
    fp32_bytes = weight_bytes(model, model.parts())["total"]
    quantize_(model, Int8WeightOnlyConfig())
    assert weight_bytes(model, model.parts())["total"] < 0.5 * fp32_bytes
    assert model.generate(clip, ["transcribe"], max_new_tokens=6) == expected


# ---------------------------------------------------------------------------------------------------
# The interface and the stand-in


def test_interface_requires_every_method():
    class Partial(AudioLanguageModel):
        def parts(self):
            return {}

    with pytest.raises(TypeError, match="abstract"):
        Partial()


def test_batch_helpers():
    batch = {"mel": torch.zeros(2, 3), "paths": ["a", "b"], "sample_rate": 16000}
    assert batch_size_of(batch) == 2
    with pytest.raises(ValueError, match="disagree"):
        batch_size_of({"mel": torch.zeros(2, 3), "fbank": torch.zeros(3, 3)})
    joined = concat_batches([batch, {"mel": torch.ones(1, 3), "paths": ["c"], "sample_rate": 16000}])
    assert batch_size_of({k: v for k, v in joined.items() if k != "sample_rate"}) == 3
    with pytest.raises(ValueError, match="different shapes"):
        concat_batches([{"mel": torch.zeros(1, 3)}, {"mel": torch.zeros(1, 4)}])


def test_standin_is_deterministic_under_a_seed():
    clip = make_clip(seed=3)
    first, second, other = StandInModel(seed=7), StandInModel(seed=7), StandInModel(seed=8)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name])
    assert not torch.equal(first.projector.weight, other.projector.weight)
    assert first.generate(clip, ["hi"], max_new_tokens=5) == second.generate(clip, ["hi"], max_new_tokens=5)


def test_standin_left_padding_matches_unpadded_rows():
    model = StandInModel()
    batch = make_clip(batch_size=2)
    prompts = ["transcribe", "describe the sound in detail"]  # different lengths → left padding
    with torch.inference_mode():
        audio = model.encode_audio(batch)
        assert audio.shape == (2, 10, 32)
        logits, cache = model.prefill(audio, prompts)
        step, _ = model.decode_step(logits.argmax(-1, keepdim=True), cache)
        for row in range(2):
            row_logits, row_cache = model.prefill(audio[row : row + 1], prompts[row : row + 1])
            row_step, _ = model.decode_step(row_logits.argmax(-1, keepdim=True), row_cache)
            torch.testing.assert_close(logits[row], row_logits[0])
            torch.testing.assert_close(step[row], row_step[0])


# ---------------------------------------------------------------------------------------------------
# Timing harness


def assert_timing_summary(summary: dict, n: int) -> None:
    assert summary["n"] == n == len(summary["samples_ms"])
    assert all(ms > 0 for ms in summary["samples_ms"])
    assert summary["p90_ms"] >= summary["median_ms"] > 0
    assert summary["mean_ms"] > 0


def test_measure_end_to_end_on_standin():
    model = StandInModel()
    cfg = small_config()
    report = measure(model, [make_clip(seed=seed) for seed in range(3)], cfg)

    assert_timing_summary(report["ttft"], n=4)
    assert_timing_summary(report["tpot"], n=4 * 3)
    assert report["tpot"]["runs"] == 4 and report["tpot"]["steps_per_run"] == 3
    assert len(report["tpot"]["median_ms_by_step"]) == 3
    assert report["ttft_ms"] == report["ttft"]["median_ms"]
    assert report["tpot_ms"] == report["tpot"]["median_ms"]

    assert report["params"] == count_parameters(model, model.parts())["total"]
    assert report["weight_bytes"] == weight_bytes(model, model.parts())["total"]
    memory = report["peak_memory"]
    assert report["peak_memory_mb"] == memory["peak_mb"]
    assert memory["runtime_growth_mb"] >= 0
    assert math.isclose(memory["peak_mb"], memory["weights_mb"] + memory["runtime_growth_mb"])
    assert memory["weights_mb"] == report["weight_bytes"] / 2**20

    throughput = report["throughput"]
    assert throughput["batch_size"] == 2 and throughput["runs"] == 2 and throughput["clips"] == 4
    assert report["throughput_clips_per_s"] == pytest.approx(4 / throughput["seconds"])
    assert report["settings"]["protocol"] == "careful" and report["settings"]["timed_runs"] == 4
    json.dumps(report, allow_nan=False)  # a report goes into results.json as it is


def test_measurement_restores_training_flags():
    model = StandInModel().train()
    model.speech_encoder.eval()  # a frozen part stays in eval mode while the rest trains
    measure(model, [make_clip()], small_config(timed_runs=1, throughput_runs=0))
    assert model.training and model.llm.training and not model.speech_encoder.training


def test_protocol_defaults_and_overrides():
    careful, hackathon = EfficiencyConfig(), EfficiencyConfig(protocol="hackathon")
    assert (careful.warmup_runs, careful.timed_runs, careful.statistic) == (3, 20, "median")
    assert (hackathon.warmup_runs, hackathon.timed_runs, hackathon.statistic) == (10, 100, "mean")
    assert careful.input_seconds is None and hackathon.input_seconds == 10.0
    assert EfficiencyConfig(protocol="hackathon", timed_runs=5).timed_runs == 5
    with pytest.raises(ValueError, match="protocol"):
        EfficiencyConfig(protocol="fast")
    with pytest.raises(ValueError, match="timed_runs"):
        EfficiencyConfig(timed_runs=0)


def test_hackathon_protocol_honours_its_run_counts():
    log: list[str] = []
    model = CountingStandIn("model", log)
    cfg = EfficiencyConfig(protocol="hackathon", decode_steps=1, throughput_runs=0, analytic=False)
    report = measure(model, [make_clip()], cfg)
    assert len(log) == 10 + 100 + 1  # warm-ups, timed runs, a memory run; throughput and the analytic pass skipped
    assert report["ttft"]["n"] == 100 and report["tpot"]["n"] == 100
    assert report["ttft_ms"] == report["ttft"]["mean_ms"]
    assert report["throughput"] is None and report["throughput_clips_per_s"] is None


def test_compare_interleaves_and_ratios_divide_per_model_numbers():
    log: list[str] = []
    models = {"teacher": CountingStandIn("teacher", log, TEACHER_CONFIG),
              "student": CountingStandIn("student", log)}
    cfg = small_config(warmup_runs=2, timed_runs=3, throughput_runs=0)
    result = compare(models, [make_clip()], cfg, reference="teacher")

    forward, backward = ["teacher", "student"], ["student", "teacher"]
    # 2 warm-ups, then 3 timed, then one metered for memory, then one untimed pass each for the analytic costs
    assert log == forward + backward + forward + backward + forward + forward + forward
    assert result["reference"] == "teacher"
    teacher = result["models"]["teacher"]
    for name, report in result["models"].items():
        for key in RATIO_KEYS:
            expected = None if report[key] is None else report[key] / teacher[key]
            assert result["ratios"][name][key] == expected
    assert all(ratio in (1.0, None) for ratio in result["ratios"]["teacher"].values())
    assert result["ratios"]["student"]["params"] < 1


def test_compare_rejects_unknown_reference_and_batched_clips():
    models = {"student": StandInModel()}
    with pytest.raises(ValueError, match="reference"):
        compare(models, [make_clip()], small_config(), reference="teacher")
    with pytest.raises(ValueError, match="batch size 1"):
        compare(models, [make_clip(batch_size=2)], small_config())


def test_summarize_statistics():
    stats = summarize([4.0, 1.0, 3.0, 2.0, 10.0])
    assert stats == {"mean_ms": 4.0, "median_ms": 3.0, "min_ms": 1.0, "p90_ms": pytest.approx(7.6), "n": 5}


@pytest.mark.parametrize("method", ["clear_refs", "sampling"])
def test_peak_memory_meter_sees_a_cpu_allocation(method):
    if PeakMemoryMeter(torch.device("cpu")).method not in (method, "clear_refs"):
        pytest.skip(f"{method} does not work here")
    meter = PeakMemoryMeter(torch.device("cpu"), method=method)
    meter.start()
    held = torch.ones(10_000_000)  # 40 MB, written to, so resident
    time.sleep(0.02)  # lets the sampling thread see it
    growth = meter.stop()
    del held
    assert growth >= 0.9 * 40_000_000


# ---------------------------------------------------------------------------------------------------
# results.json


def full_metrics() -> dict:
    return {"wer": 0.0634, "cer": 0.031, "cider_d": 0.41, "spice": 0.12, "spider": 0.265,
            "params": 62224, "weight_bytes": 248896, "peak_memory_mb": 0.47, "ttft_ms": 3.3, "tpot_ms": 0.86}


def test_results_round_trip_with_an_unavailable_metric(tmp_path):
    metrics = {k: v for k, v in full_metrics().items() if k not in ("spice", "spider")}
    reasons = {"spice": "Java runtime not found", "spider": "needs SPICE"}
    results = build_results(metrics, {"wer": {"normalizer": "whisper_english"}}, reasons, model="student")
    path = write_results(tmp_path / "run" / "results.json", results)

    loaded = load_results(path)
    assert loaded == results
    assert loaded["spice"] is None and loaded["unavailable"]["spice"] == "Java runtime not found"
    assert set(METRIC_KEYS) <= set(loaded)
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left
    summary = format_summary(loaded)
    assert "unavailable: Java runtime not found" in summary and "student" in summary
    assert all(key in summary for key in METRIC_KEYS)


def test_results_validation_errors(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        build_results({k: v for k, v in full_metrics().items() if k != "wer"}, {})
    with pytest.raises(ValueError, match="both"):
        build_results(full_metrics(), {}, {"wer": "no references"})
    good = build_results(full_metrics(), {})
    for broken, match in [({**good, "cer": None}, "without a reason"),
                          ({**good, "cer": float("nan")}, "finite"),
                          ({**good, "cer": True}, "finite"),
                          ({k: v for k, v in good.items() if k != "settings"}, "settings")]:
        with pytest.raises(ValueError, match=match):
            validate_results(broken)
    (tmp_path / "results.json").write_text(json.dumps({k: v for k, v in good.items() if k != "tpot_ms"}))
    with pytest.raises(ValueError, match="tpot_ms"):
        load_results(tmp_path / "results.json")


def test_efficiency_report_feeds_results():
    report = measure(StandInModel(), [make_clip()], small_config(timed_runs=2, throughput_runs=0))
    values, unavailable = efficiency_metrics(report)
    quality = {k: v for k, v in full_metrics().items() if k in ("wer", "cer", "cider_d", "spice", "spider")}
    results = build_results({**quality, **values}, {"efficiency": report["settings"]}, unavailable)
    assert results["ttft_ms"] == report["ttft_ms"] and results["params"] == report["params"]
    missing_memory = {**report, "peak_memory_mb": None}
    _, unavailable = efficiency_metrics(missing_memory)
    assert unavailable == {"peak_memory_mb": report["peak_memory"]["method"]}
