"""Commands: one clear message instead of a traceback, `--help` that lists every config key without loading torch,
`--config` required, `--print-config`, and no third-party noise on stderr."""

import dataclasses
import json
import logging
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from common.annotations import DataError
from common.cli import config_keys, quiet_third_party_logs, run
from common.config import ConfigError, job_config_class

ROOT = Path(__file__).resolve().parents[1]
# The lines every command printed before (torchao on import, torch's pytree on torchao's enums, DeepSpeed).
NOISE = ("Failed to load", "_pytree", "is an Enum subclass", "Setting accelerator to CPU")


def command(*args: str, cwd: Path = ROOT, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python -m ...` as a user types it, in a child process that imports this checkout (PYTHONPATH is inherited)."""
    return subprocess.run([sys.executable, *flags, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def jobs() -> list[str]:
    """Every module that a YAML under configs/ names as its job."""
    names = {yaml.safe_load(p.read_text()).get("job") for p in (ROOT / "configs").rglob("*.yaml")}
    return sorted(n for n in names if n)


def real_keys(config, prefix: str = "") -> dict[str, list]:
    """Dotted key -> [value in a default instance, declared default] of a dataclass instance, nested dataclasses
    expanded, from the imported class itself. The two differ where a parent's default factory sets a nested field
    (`LLMConfig(architecture="gemma2")`) or `__post_init__` fills in a `None` (the source shows what the user sets)."""
    keys, hints = {}, typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not f.init:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= real_keys(value, f"{prefix}{f.name}.")
        else:
            declared = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            keys[prefix + f.name] = [list(v) if isinstance(v, tuple) else v for v in (value, declared)]
    return keys


@pytest.mark.parametrize("job", jobs())
def test_help_lists_exactly_the_keys_and_defaults_of_the_job_config(job):
    cls = job_config_class(job)
    doc, keys = config_keys(sys.modules[job].__file__)
    expected = real_keys(cls())
    assert [k.name for k in keys] == list(expected)  # read from the source, in the dataclass's order
    for key in keys:
        if key.literal:  # the help shows the value in YAML spelling: reading it back gives the real default
            assert yaml.safe_load(key.default) in expected[key.name], key
    assert doc == cls.__doc__


def test_help_answers_from_the_source_without_importing_torch():
    out = command("distill.train", "--help", flags=("-X", "importtime"))
    assert out.returncode == 0, out.stderr
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "common.cli" in imported and not {"torch", "transformers", "peft"} & imported
    assert out.stdout.startswith("usage: python -m distill.train")
    assert "  kd.kd_weight: float = 1.0\n      Weight of the logit KD term (0 trains with CE only).\n" in out.stdout
    example = out.stdout.split("(e.g. ")[1].split(")")[0].split()[-1]  # the help's own override example
    key, value = example.split("=")
    assert key in {k.name for k in config_keys(ROOT / "distill" / "train.py")[1]}


def test_a_job_without_config_stops_before_running():
    out = command("toybench.generate")
    assert out.returncode == 2 and "the following arguments are required: --config" in out.stderr
    assert out.stderr.startswith("usage: python -m toybench.generate")
    # A job reached through a dispatcher gets its argv as a list, and still refuses to run on defaults.
    out = command("experiments", "ablation", "status=true")
    assert out.returncode == 2 and "the following arguments are required: --config" in out.stderr


def test_print_config_prints_the_resolved_yaml_and_exits():
    out = command("toybench.generate", "--config", "configs/smoke/data.yaml", "--print-config", "seed=7")
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["job"] == "toybench.generate" and printed["seed"] == 7 and printed["size"] == "smoke"


def test_a_config_typo_is_one_message_not_a_traceback(tmp_path):
    config = tmp_path / "data.yaml"
    config.write_text("job: toybench.generate\nsize: smoke\nseeed: 3\n")
    out = command("toybench.generate", "--config", str(config))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"config error: {config}: unknown key 'seeed' — did you mean 'seed'?"


def test_a_missing_audio_file_is_one_message_not_a_traceback_nor_noise(tmp_path):
    """A real job on an annotation whose audio is missing, with data.on_error at its default (raise). teacher.train
    imports transformers' model code, peft and torchao: its stderr is also where their noise showed."""
    annotation = tmp_path / "train.json"
    annotation.write_text(json.dumps({"annotation": [{"path": "clips/missing.wav", "text": "hi", "task": "asr"}]}))
    out = command("teacher.train", "--config", str(ROOT / "configs/smoke/teacher.yaml"), f"data.train=[{annotation}]",
                  f"output_dir={tmp_path / 'out'}", f"log_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    message = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(message) == 1 and message[0].startswith("data error: ")
    assert str(annotation) in message[0] and "missing.wav" in message[0] and "data.on_error=skip" in message[0]
    assert not [line for line in out.stderr.splitlines() + out.stdout.splitlines() if any(n in line for n in NOISE)]


def test_run_exit_codes(capsys):
    def fail(err):
        def main():
            raise err
        return main

    for main, code in [(lambda: 3, 3), (lambda: {"wer": 0.1}, 0), (lambda: None, 0),
                       (fail(ConfigError("a.yaml: unknown key 'x'")), 2), (fail(DataError("b.json: gone", "x")), 1)]:
        with pytest.raises(SystemExit) as exc:
            run(main)
        assert exc.value.code == code
    assert capsys.readouterr().err.splitlines() == ["config error: a.yaml: unknown key 'x'", "data error: b.json: gone"]
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run(fail(KeyError("bug")))


def test_known_noise_is_dropped_and_nothing_else():
    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    seen, handler = [], Collect()
    quiet_third_party_logs()
    quiet_third_party_logs()  # twice adds no second filter
    assert len(logging.getLogger("torchao").filters) == 1
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree", "DeepSpeed")]
    for logger in loggers:  # on each logger: DeepSpeed's does not propagate to the root
        logger.addHandler(handler)
    try:
        loggers[0].warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
        loggers[0].warning("Skipping import of cpp extensions")
        loggers[1].warning("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value "
                           "type.", "<enum 'KernelPreference'>")
        loggers[2].warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to ...")
        loggers[2].warning("ZeRO-3 needs more memory")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert seen == ["Skipping import of cpp extensions", "ZeRO-3 needs more memory"]
