"""Typed job configs: one YAML per job, dataclasses as the schema, `key=value` overrides.

Every YAML under `configs/` names the module that runs it in its top-level `job:` key (for example
`job: teacher.train`); that module defines a dataclass called `JobConfig`. Loading checks every key and
type against the dataclass: an unknown key or a wrong type stops the run with a message that names the
file, the key, and the closest valid key. The resolved config (after overrides) is written beside every
output so a run can be reproduced and stages can be skipped when nothing changed.

A job with both `output_dir` and `log_dir` keeps them paired (`LOG_DIR_RULE`): a log folder belongs to the output
folder it was given with, so a run written elsewhere never logs into (and starts over in) another run's folder.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import importlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from common.errors import ConfigError
from common.hub import resolved_from

T = TypeVar("T")


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    if match:
        return f"did you mean '{match[0]}'?"
    return f"valid keys: {', '.join(sorted(valid))}"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against type annotation `tp`, returning the typed value (nested dataclasses built)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads `1e-4` as a string (it needs a dot: 1.0e-4); accept both spellings.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r} (quote it in YAML)")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)} in schema")


def _build(cls: type[T], data: dict, where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{key}' — {_closest(key, list(fields))}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: required key '{name}' is missing")
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a schema's own check (__post_init__), named by where it sits
        raise ConfigError(f"{where}.{err}" if where else str(err)) from None


def from_dict(cls: type[T], data: dict, source: str = "<config>") -> T:
    """Build dataclass `cls` from a nested dict, checking every key and type. `source` names the file."""
    try:
        return _build(cls, data, "")
    except ConfigError as err:
        msg = str(err).lstrip(": ")
        raise ConfigError(f"{source}: {msg}") from None


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts/lists (what YAML and JSON can hold)."""
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value (e.g. train.lr=3e-4)")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"override '{item}': the key is empty")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str], cls: type) -> dict:
    """Set dotted `key=value` overrides in the raw dict; values are read as YAML scalars or lists."""
    for item in overrides:
        path, value = _parse_override(item)
        node, schema = data, cls
        for depth, part in enumerate(path):
            names = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []
            if dataclasses.is_dataclass(schema) and part not in names:
                dotted = ".".join(path[:depth] + [part])
                raise ConfigError(f"override '{item}': unknown key '{dotted}' — {_closest(part, names)}")
            if depth == len(path) - 1:
                node[part] = value
                break
            child_tp = typing.get_type_hints(schema)[part] if dataclasses.is_dataclass(schema) else Any
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node, schema = node[part], child_tp
    return data


INCLUDE = "include"
"""Top-level YAML key naming files (relative to the including file) whose mappings are read first and merged under
this file's keys, e.g. a preset's `shared.yaml`, which names the data once for all its stages."""


def merge_mappings(base: dict, top: dict) -> dict:
    """`top` over `base`, nested mappings merged key by key (any other value in `top` replaces `base`'s)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merge_mappings(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML mapping, turning parser errors into a message with the file and line. Files named by its
    `include:` key (a path or a list, relative to this file) are read first and this file's keys merged over them."""
    path = Path(path)
    if not path.is_file():
        where = f" (included by {_chain[-1]})" if _chain else ""
        raise ConfigError(f"{path}: config file not found{where}")
    if path.resolve() in _chain:
        raise ConfigError(f"{path}: includes itself through {' → '.join(str(p) for p in _chain)}; remove the cycle")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    includes = data.pop(INCLUDE, None)
    if includes is None:
        return data
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: `{INCLUDE}` must be a file name or a list of them (relative to this file)")
    base: dict = {}
    for name in includes:
        base = merge_mappings(base, read_yaml(path.parent / name, (*_chain, path.resolve())))
    return merge_mappings(base, data)


def job_name(cls: type) -> str:
    """The module that runs a job config class (its real name also when run as `python -m module`): the class's
    `job` ClassVar when it has one (a config that lives in a library module, read by several commands), else the
    module that defines it."""
    declared = getattr(cls, "job", None)  # a `ClassVar[str]`; no job config has a `job` key
    if isinstance(declared, str):
        return declared
    if cls.__module__ == "__main__":
        import sys

        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is not None:
            return spec.name
    return cls.__module__


def job_config_class(job: str) -> type:
    """The dataclass `JobConfig` of the module that runs `job` (e.g. 'teacher.train')."""
    try:
        module = importlib.import_module(job)
    except ModuleNotFoundError as err:
        raise ConfigError(f"job '{job}': no such module ({err})") from None
    if not hasattr(module, "JobConfig"):
        raise ConfigError(f"job '{job}': module {module.__name__} defines no JobConfig dataclass")
    return module.JobConfig


LOG_DIR_RULE = ("empty, or not given where `output_dir` is (the YAML sets `output_dir` but not `log_dir`, or a "
                "`output_dir=` override comes without `log_dir=`): `<output_dir>/logs`, so runs written to different "
                "folders never share (and restart) one log folder")
"""How `log_dir` follows `output_dir` (`follow_output_dir`); quoted in the `log_dir` docs of the jobs."""


def follow_output_dir(data: dict, file_keys: set[str], override_keys: set[str], cls: type) -> dict:
    """Pair `log_dir` with `output_dir` in the raw config dict (`LOG_DIR_RULE`).

    `file_keys` are the top-level keys the YAML set, `override_keys` those the command line set. A `log_dir`
    counts only when it comes from the same place as the `output_dir` or a later one: a preset's `log_dir`
    belongs to the preset's `output_dir`, not to an `output_dir=` override of it.
    """
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    if not {"output_dir", "log_dir"} <= names:
        return data
    if "output_dir" in override_keys:
        derived = "log_dir" not in override_keys
    elif "output_dir" in file_keys:
        derived = "log_dir" not in file_keys and "log_dir" not in override_keys
    else:
        derived = False
    if derived or data.get("log_dir") == "":
        output_dir = data.get("output_dir", next(f.default for f in dataclasses.fields(cls) if f.name == "output_dir"))
        data["log_dir"] = str(Path(output_dir) / "logs")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Load a job config from YAML (or defaults when `path` is None) and apply `key=value` overrides.

    The YAML's `job:` key, if present, must name a module whose `JobConfig` is `cls`. `log_dir` follows
    `output_dir` as `LOG_DIR_RULE` says.
    """
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    job = data.pop("job", None)
    data.pop(RESOLVED_FROM, None)  # a saved config's record of hub commits, not a setting
    if job is not None and job != job_name(cls):
        raise ConfigError(f"{source}: 'job: {job}' is a config for another job than {cls.__module__}")
    file_keys = set(data)
    data = apply_overrides(data, list(overrides), cls)
    override_keys = {item.partition("=")[0] for item in overrides}
    data = follow_output_dir(data, file_keys, override_keys, cls)
    return from_dict(cls, data, source)


def load_job_config(path: str | Path, overrides: list[str] = ()) -> Any:
    """Load any YAML under configs/ with the schema of the job it names."""
    data = read_yaml(path)
    if "job" not in data:
        raise ConfigError(f"{path}: missing top-level 'job:' key naming the module that runs it")
    return load_config(job_config_class(data["job"]), path, overrides)


def added_option(default: Any) -> Any:
    """A dataclass field for an option added after stages were run: at its default (the old behaviour) it is left
    out of `config_hash`, so finished stages stay current; any other value enters the hash as usual. A mutable
    default (a dict, a list) is copied for every instance."""
    metadata = {"hash": "omit_at_default", "default": default}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _hashed(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _hashed(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get("hash") == "omit_at_default" and getattr(obj, f.name) == f.metadata["default"])}
    if isinstance(obj, (list, tuple)):
        return [_hashed(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _hashed(v) for k, v in obj.items()}
    return obj


def config_hash(cfg: Any) -> str:
    """A stable hash of the resolved config, used to skip a stage whose inputs did not change."""
    blob = json.dumps(_hashed(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


RESOLVED_FROM = "resolved_from"
"""Top-level key of a saved config: the hub snapshot (repository, commit, cache folder) of every hub id in it. A
record only: loading the config again ignores it (pin a commit with `key=owner/name@<commit>`)."""


def _strings(data: Any) -> set[str]:
    """Every string value in a nested dict/list, and a dataset source's id without its `:split`."""
    if isinstance(data, dict):
        return set().union(*(_strings(v) for v in data.values()))
    if isinstance(data, list):
        return set().union(*(_strings(v) for v in data))
    return {data, data.partition(":")[0]} if isinstance(data, str) else set()


def save_resolved(cfg: Any, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config beside a stage's outputs (YAML, with the job module and hash)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"job": job_name(type(cfg)), **to_dict(cfg)}
    hub = resolved_from(_strings(data))
    if hub:
        data[RESOLVED_FROM] = hub
    path = out_dir / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"# resolved config, hash {config_hash(cfg)}\n" + yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)
    return path


def parse_cli(cls: type[T], argv: list[str] | None = None, description: str = "",
              config_required: bool | None = None, prog: str | None = None) -> tuple[T, bool]:
    """Standard job entry point: `python -m <job> --config FILE [--force] [--print-config] [key=value ...]`.

    Returns the config and whether `--force` (rerun even if the output is up to date) was given. On the command
    line (`argv` None) `--config` is required, so that a job never runs on defaults nobody chose; a Python caller
    passing `argv` may leave it out and start from the dataclass defaults (`config_required=True` refuses that too,
    for a command reached through a dispatcher such as `python -m experiments ablation`). `--print-config` prints the
    resolved YAML and exits 0. `prog` names the command in the usage line when it is not the job's own module (a
    benchmark that reads another job's config). `--help` lists every config key (see `common.cli`).
    """
    import sys

    from common.cli import job_parser

    job = job_name(cls)
    source = getattr(sys.modules.get(cls.__module__), "__file__", None)
    required = argv is None if config_required is None else config_required
    parser = job_parser(prog or job, source, cls.__name__, description=description, config_required=required)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(cls, args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(yaml.safe_dump({"job": job, **to_dict(cfg)}, sort_keys=False), end="")
        raise SystemExit(0)
    return cfg, args.force
