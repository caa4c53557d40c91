"""Typed configs: every YAML in configs/ loads; bad keys, types and overrides fail with clear messages."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from common.config import (
    ConfigError,
    config_hash,
    from_dict,
    load_config,
    load_job_config,
    mark_stage_done,
    parse_cli,
    save_resolved,
    stage_is_current,
)

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


def test_cli_exits_with_message(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_cli(Job, ["stepz=3"])
    assert exc.value.code == 2
    assert "did you mean 'steps'" in capsys.readouterr().err
    cfg, force = parse_cli(Job, ["steps=3", "--force"])
    assert cfg.steps == 3 and force


def test_stage_skip_marker(tmp_path):
    cfg = load_config(Job, None, ["steps=3"])
    assert not stage_is_current(cfg, tmp_path)
    mark_stage_done(cfg, tmp_path)
    assert stage_is_current(cfg, tmp_path)
    assert not stage_is_current(load_config(Job, None, ["steps=4"]), tmp_path)
    assert (tmp_path / "config.yaml").is_file()
