"""Typed configs: every YAML in configs/ loads; bad keys, types and overrides fail with clear messages."""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from common.config import (
    ConfigError,
    added_option,
    config_hash,
    from_dict,
    load_config,
    load_job_config,
    parse_cli,
    save_resolved,
)
from common.stages import mark_stage_done, stage_is_current

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class Job:
    name: str = "run"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)
    mode: Literal["online", "cached"] = "cached"
    ckpt: str | None = None
    weights: dict[str, float] = field(default_factory=dict)


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def job_yamls():
    return sorted(p for p in CONFIGS.rglob("*.yaml") if "job" in (yaml.safe_load(p.read_text()) or {}))


def test_every_yaml_in_configs_loads():
    paths = job_yamls()
    assert paths, "configs/ holds no job YAML"
    for path in paths:
        cfg = load_job_config(path)
        assert type(cfg).__name__ == "JobConfig", path


def test_every_yaml_header_comment_is_its_launch_command():
    for path in job_yamls():
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and str(path.relative_to(CONFIGS.parent)) in first, (path, first)


def test_nested_overrides_and_types(tmp_path):
    path = write(tmp_path, "name: a\noptim:\n  lr: 0.1\n")
    cfg = load_config(Job, path, ["optim.lr=3e-4", "steps=5", "mode=online", "weights.kd=0.5", "ckpt=null"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.steps == 5 and cfg.mode == "online" and cfg.weights == {"kd": 0.5} and cfg.ckpt is None
    assert cfg.optim.betas == [0.9, 0.999]


def test_unknown_key_names_closest(tmp_path):
    path = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"job.yaml: optim: unknown key 'lrr' — did you mean 'lr'\?"):
        load_config(Job, path)


def test_unknown_override_names_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrate' — did you mean 'lr'\?"):
        load_config(Job, None, ["optim.lrate=1"])
    with pytest.raises(ConfigError, match=r"did you mean 'steps'"):
        load_config(Job, None, ["step=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(Job, None, ["steps"])


def test_wrong_types_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"steps: expected an integer, got 'ten'"):
        load_config(Job, write(tmp_path, "steps: ten\n"))
    with pytest.raises(ConfigError, match=r"steps: expected an integer, got 1.5"):
        load_config(Job, None, ["steps=1.5"])
    with pytest.raises(ConfigError, match=r"mode: must be one of \['online', 'cached'\]"):
        load_config(Job, None, ["mode=offline"])
    with pytest.raises(ConfigError, match=r"optim.betas\[1\]: expected a number"):
        from_dict(Job, {"optim": {"betas": [0.9, "x"]}})
    with pytest.raises(ConfigError, match=r"optim: expected a mapping"):
        from_dict(Job, {"optim": 3})


def test_a_schema_check_names_the_file_and_key(tmp_path):
    # loop.eval_every=0 once reached `step % eval_every` deep in the training loop (ZeroDivisionError).
    from common.training_config import LoopConfig

    @dataclass
    class Trainer:
        loop: LoopConfig = field(default_factory=LoopConfig)

    path = write(tmp_path, "loop:\n  eval_every: 0\n")
    with pytest.raises(ConfigError, match=r"job.yaml: loop.eval_every must be at least 1, got 0 \(to evaluate or "
                                          r"save only at the end, set it to max_steps\)"):
        load_config(Trainer, path)
    with pytest.raises(ConfigError, match=r"loop.batch_size must be at least 1, got -2$"):
        load_config(Trainer, None, ["loop.batch_size=-2"])
    assert load_config(Trainer, None, ["loop.eval_every=7"]).loop.eval_every == 7


def test_malformed_yaml_names_file(tmp_path):
    with pytest.raises(ConfigError, match=r"job.yaml: not valid YAML"):
        load_config(Job, write(tmp_path, "steps: [1, 2\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Job, tmp_path / "nope.yaml")


def test_resolved_config_roundtrip_and_hash(tmp_path):
    cfg = load_config(Job, None, ["steps=7"])
    path = save_resolved(cfg, tmp_path)
    data = yaml.safe_load(path.read_text())
    assert data["job"] == __name__ and data["steps"] == 7
    data.pop("job")
    assert from_dict(Job, data) == cfg
    assert config_hash(cfg) == config_hash(load_config(Job, None, ["steps=7"]))
    assert config_hash(cfg) != config_hash(load_config(Job, None, ["steps=8"]))


@dataclass
class LaterOptim(Optim):
    clip: float = added_option(0.0)


@dataclass
class LaterJob(Job):
    optim: LaterOptim = field(default_factory=LaterOptim)
    subset: int = added_option(0)


def test_an_option_added_later_keeps_finished_stages_current_at_its_default(tmp_path):
    old = load_config(Job, None, ["steps=7"])
    mark_stage_done(old, tmp_path)
    later = load_config(LaterJob, None, ["steps=7"])
    assert config_hash(later) == config_hash(old) and stage_is_current(later, tmp_path)
    for override in ("subset=5", "optim.clip=1.0"):
        changed = load_config(LaterJob, None, ["steps=7", override])
        assert config_hash(changed) != config_hash(old) and not stage_is_current(changed, tmp_path)
    saved = yaml.safe_load(save_resolved(later, tmp_path / "resolved").read_text())
    assert saved["subset"] == 0 and saved["optim"]["clip"] == 0.0  # the resolved file still shows every option


def test_cli_exits_with_message(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_cli(Job, ["stepz=3"])
    assert exc.value.code == 2
    assert "did you mean 'steps'" in capsys.readouterr().err
    cfg, force = parse_cli(Job, ["steps=3", "--force"])  # a Python caller may start from the defaults
    assert cfg.steps == 3 and force


def test_cli_requires_config_on_the_command_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["job", "steps=3"])
    with pytest.raises(SystemExit) as exc:
        parse_cli(Job)
    assert exc.value.code == 2 and "the following arguments are required: --config" in capsys.readouterr().err


def test_cli_help_lists_the_keys_and_print_config_the_resolved_yaml(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_cli(Job, ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "  optim.lr: float = 0.001\n" in out and "  mode: Literal['online', 'cached'] = cached\n" in out
    config = tmp_path / "job.yaml"
    config.write_text("steps: 4\n")
    with pytest.raises(SystemExit) as exc:
        parse_cli(Job, ["--config", str(config), "--print-config", "optim.lr=0.5"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert exc.value.code == 0 and printed["steps"] == 4 and printed["optim"] == {"lr": 0.5, "betas": [0.9, 0.999]}


def test_stage_skip_marker(tmp_path):
    cfg = load_config(Job, None, ["steps=3"])
    assert not stage_is_current(cfg, tmp_path)
    mark_stage_done(cfg, tmp_path)
    assert stage_is_current(cfg, tmp_path)
    assert not stage_is_current(load_config(Job, None, ["steps=4"]), tmp_path)
    assert (tmp_path / "config.yaml").is_file()


def test_every_yaml_is_a_job_or_an_accelerate_config():
    """...or a preset's `shared.yaml`, which stage YAMLs include."""
    others = sorted(p for p in CONFIGS.rglob("*.yaml") if p not in job_yamls() and p.name != "shared.yaml")
    assert others == sorted((CONFIGS / "accelerate").glob("*.yaml")), others


def test_accelerate_configs_parse_with_accelerate_and_name_existing_deepspeed_json(monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    monkeypatch.chdir(CONFIGS.parent)  # the configs name the DeepSpeed JSON relative to the repository root
    kinds = {}
    for path in sorted((CONFIGS / "accelerate").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# accelerate launch --config_file ") and str(path.relative_to(CONFIGS.parent)) in first
        config = load_config_from_file(str(path))
        kinds[path.stem] = config.distributed_type
        if config.distributed_type == DistributedType.DEEPSPEED:
            json_file = Path(config.deepspeed_config["deepspeed_config_file"])
            assert json_file.is_file() and json_file.parent == Path("configs/deepspeed"), json_file
            assert config.deepspeed_config["zero3_init_flag"] is False  # models are built whole, sharded at prepare
            assert config.mixed_precision is None  # the job's loop.precision decides (fp16 on a V100)
    assert kinds == {"one_gpu": DistributedType.NO, "ddp": DistributedType.MULTI_GPU,
                     "deepspeed_zero2": DistributedType.DEEPSPEED, "deepspeed_zero3": DistributedType.DEEPSPEED}


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_json_passes_deepspeeds_own_parser(name, stage):
    """What fit() hands DeepSpeed for an fp16 job: the JSON with its "auto" values filled from the job."""
    import json

    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig

    from common.distributed import fill_deepspeed_config
    from common.training import LoopConfig, OptimConfig

    config = json.loads((CONFIGS / "deepspeed" / f"{name}.json").read_text())
    assert "optimizer" not in config and "scheduler" not in config  # torch's AdamW and fit's schedule
    fill_deepspeed_config(config, LoopConfig(batch_size=4, grad_accum=2), OptimConfig(grad_clip=1.0))
    plugin = DeepSpeedPlugin(hf_ds_config=config)
    plugin.set_mixed_precision("fp16")
    parsed = DeepSpeedConfig(plugin.deepspeed_config)
    assert parsed.zero_optimization_stage == stage
    assert parsed.float16_config.enabled and parsed.float16_config.loss_scale == 0  # dynamic loss scaling
    assert not parsed.bfloat16_config.enabled  # a V100 has no bf16
    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (4, 2)
    assert parsed.gradient_clipping == 1.0
    if stage == 3:
        assert parsed.zero_config.gather_16bit_weights_on_model_save  # checkpoints gather the shards
    # A number that disagrees with the job is refused, naming the key and both values.
    bad = json.loads((CONFIGS / "deepspeed" / f"{name}.json").read_text()) | {"train_micro_batch_size_per_gpu": 8}
    with pytest.raises(ValueError, match=r"x.json: train_micro_batch_size_per_gpu is 8 but the job says 4"):
        fill_deepspeed_config(bad, LoopConfig(batch_size=4), OptimConfig(), "x.json")
    # DeepSpeed's parser itself rejects a misspelt key, so the test above would catch one in our JSON.
    with pytest.raises(Exception, match="overlap_comn"):
        DeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage,
                                                                                    "overlap_comn": True}})


def test_a_stage_goes_stale_when_an_input_it_read_changes(tmp_path):
    @dataclass
    class Job:
        model: str = ""
        lr: float = 1e-3

    model = tmp_path / "student" / "model"
    model.mkdir(parents=True)
    (model / "weights.safetensors").write_bytes(b"abc")
    cfg, out = Job(model=str(model)), tmp_path / "pruned"
    mark_stage_done(cfg, out, inputs=[cfg.model])
    assert stage_is_current(cfg, out, inputs=[cfg.model])
    assert not stage_is_current(Job(model=str(model), lr=2e-3), out, inputs=[cfg.model])  # another config
    (model / "DONE").write_text("x")  # the input's own bookkeeping does not count
    (model / "config.yaml").write_text("x: 1")
    assert stage_is_current(cfg, out, inputs=[cfg.model])
    (model / "weights.safetensors").write_bytes(b"abcd")  # the input was retrained
    assert not stage_is_current(cfg, out, inputs=[cfg.model])
    mark_stage_done(cfg, out, inputs=[cfg.model])
    assert stage_is_current(cfg, out, inputs=[cfg.model])
    assert stage_is_current(cfg, out, inputs=[cfg.model, ""])  # an unset input path is no input


@dataclass
class Stage:
    output_dir: str = "outputs/toy/x"
    log_dir: str = "runs/toy/x"


def test_log_dir_follows_an_output_dir_given_without_it(tmp_path):
    """A preset's log_dir belongs to the preset's output_dir: a run written elsewhere must not log (and start over)
    in the preset's log folder."""
    path = write(tmp_path, "output_dir: outputs/p/x\nlog_dir: runs/p/x\n")
    assert load_config(Stage, path).log_dir == "runs/p/x"
    moved = load_config(Stage, path, ["output_dir=elsewhere/x"])
    assert (moved.output_dir, moved.log_dir) == ("elsewhere/x", "elsewhere/x/logs")
    assert load_config(Stage, path, ["output_dir=elsewhere/x", "log_dir=runs/mine"]).log_dir == "runs/mine"
    assert load_config(Stage, path, ["log_dir=runs/mine"]).log_dir == "runs/mine"
    assert load_config(Stage, path, ["log_dir="]).log_dir == "outputs/p/x/logs"
    assert load_config(Stage, write(tmp_path, "output_dir: outputs/q\n")).log_dir == "outputs/q/logs"
    assert load_config(Stage).log_dir == "runs/toy/x"  # the defaults are a pair too
    assert load_config(Job, None, ["name=x"]).name == "x"  # a job without both keys is left alone

    from distill.train import JobConfig as DistillJob

    preset = CONFIGS / "smoke" / "distill.yaml"
    assert load_config(DistillJob, preset).log_dir == "runs/smoke/student"
    other = load_config(DistillJob, preset, ["kd.kd_weight=0", f"output_dir={tmp_path / 'other'}"])
    assert other.log_dir == str(tmp_path / "other" / "logs")


def test_include_merges_under_the_file_and_refuses_cycles(tmp_path):
    (tmp_path / "shared.yaml").write_text("name: shared\noptim:\n  lr: 0.5\n  betas: [0.1, 0.2]\nsteps: 3\n")
    path = write(tmp_path, "include: shared.yaml\nsteps: 4\noptim:\n  lr: 0.25\n")
    cfg = load_config(Job, path)
    # the including file wins key by key, nested mappings merge, the rest comes from the included file
    assert (cfg.name, cfg.steps, cfg.optim.lr, cfg.optim.betas) == ("shared", 4, 0.25, [0.1, 0.2])
    assert load_config(Job, path, ["optim.lr=0.125"]).optim.lr == 0.125  # command-line overrides still win
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(Job, tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found \(included by"):
        load_config(Job, write(tmp_path, "include: [shared.yaml, missing.yaml]\n"))


def test_every_preset_names_its_data_once():
    """A preset's data paths live in its `shared.yaml`; no stage YAML repeats them (switching datasets is one edit)."""
    for shared in sorted(CONFIGS.glob("*/shared.yaml")):
        paths = {p for split in yaml.safe_load(shared.read_text())["data"].values() for p in split}
        assert paths
        for stage in sorted(shared.parent.glob("*.yaml")):
            if stage == shared:
                continue
            raw = yaml.safe_load(stage.read_text()) or {}
            named = {p for key in ("train", "valid", "test") for p in (raw.get("data") or {}).get(key, [])}
            assert not named & paths, f"{stage} names {sorted(named & paths)}: leave them to {shared.name}"
            if "data" in raw or raw.get("job") in ("teacher.train", "distill.train", "evaluation.run"):
                chain = [stage]  # directly, or through another stage's YAML (recover.yaml includes distill.yaml)
                while (yaml.safe_load(chain[-1].read_text()) or {}).get("include") not in (None, "shared.yaml"):
                    chain.append(shared.parent / yaml.safe_load(chain[-1].read_text())["include"])
                    assert len(chain) < 4, chain
                assert yaml.safe_load(chain[-1].read_text()).get("include") == "shared.yaml", \
                    f"{stage} does not include shared.yaml"
