"""What every `python -m <module>` command shares: its `--help`, its error messages, its quiet start.

A job module (one that runs `common.config.parse_cli`) starts and ends like this:

    if __name__ == "__main__":  # before the heavy imports below: quiet third-party noise, answer --help now
        from common.cli import before_imports

        before_imports()

    import torch
    ...

    if __name__ == "__main__":
        run(main)

`--help` lists every config key (dotted), with its type, default and the first line of its docstring, read from the
source with `ast`, so it answers without importing torch, transformers or peft (seconds saved on every look-up).
`run` turns a `ConfigError` or `DataError` into one message on stderr and a non-zero exit, without a traceback.
This module imports nothing heavy: it runs before the job's own imports.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

# Third-party log lines that fire on every start and that a user can do nothing about: (logger, message start).
# torchao (imported by transformers' model code and by peft) cannot load its CUDA-only kernels on a CPU machine;
# it registers two enums with torch's pytree, which torch now calls deprecated; DeepSpeed says it picked the CPU.
KNOWN_NOISE = (
    ("torchao", "Failed to load "),
    ("torch.utils._pytree", "%s is an Enum subclass and is now natively supported by torch.compile"),
    ("DeepSpeed", "Setting accelerator to CPU."),
)


class _DropKnownNoise(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def quiet_third_party_logs() -> None:
    """Drop the `KNOWN_NOISE` lines, each only from its own logger: everything else those libraries log still shows.
    Safe to call before the libraries are imported (their loggers are the same objects) and more than once."""
    for name, start in KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) and f.start == start for f in logger.filters):
            logger.addFilter(_DropKnownNoise(start))


# ---------------------------------------------------------------------------------------------------------------
# The config keys of a job, read from its source


@dataclass
class Key:
    """One config key as `--help` lists it: dotted name, type and default as written in the source, doc line."""

    name: str
    type: str
    default: str
    doc: str
    literal: bool = True
    """Whether `default` is the value itself (in YAML spelling), not a Python expression that computes it."""


def _is_dataclass_def(node: ast.ClassDef) -> bool:
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if ast.unparse(target) in ("dataclass", "dataclasses.dataclass"):
            return True
    return False


def _module_file(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


class _Sources:
    """Parsed modules, and where a class name used in one of them is defined (following `from X import Name`)."""

    def __init__(self):
        self.trees: dict[Path, ast.Module] = {}

    def tree(self, path: Path) -> ast.Module:
        if path not in self.trees:
            self.trees[path] = ast.parse(path.read_text(), filename=str(path))
        return self.trees[path]

    def find_class(self, path: Path, name: str, depth: int = 0) -> tuple[Path, ast.ClassDef] | None:
        tree = self.tree(path)
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return path, node
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level == 0 and depth < 8:
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        source = _module_file(node.module)
                        if source is not None:
                            return self.find_class(source, alias.name, depth + 1)
        return None


def _docstring_after(body: list[ast.stmt], i: int) -> str:
    """The first sentence of the attribute docstring under the statement `body[i]`, or ''."""
    if i + 1 < len(body):
        nxt = body[i + 1]
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            paragraph = " ".join(nxt.value.value.strip().split("\n\n")[0].split())
            return re.split(r"(?<=[.!?])\s+(?=[A-Z`(])", paragraph, maxsplit=1)[0]  # its first sentence
    return ""


def _as_yaml(source: str) -> tuple[str, bool]:
    """(a literal default as one would write it in YAML or a `key=value` override, True), or (any other expression
    as written, False)."""
    empty = {"list()": "[]", "tuple()": "[]", "dict()": "{}"}
    if source in empty:
        return empty[source], True
    try:
        value = ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return source, False
    if isinstance(value, str) and value and value.strip() == value and value.isprintable() and ": " not in value:
        return value, True
    return json.dumps(list(value) if isinstance(value, tuple) else value), True


def _default(value: ast.expr | None) -> tuple[str, ast.expr | None]:
    """(the default as written, the call that builds a nested dataclass default or None) of a field's value."""
    if value is None:
        return "(required)", None
    if isinstance(value, ast.Call) and ast.unparse(value.func) in ("field", "dataclasses.field", "added_option"):
        if ast.unparse(value.func) == "added_option" and value.args:
            return ast.unparse(value.args[0]), None
        for kw in value.keywords:
            if kw.arg == "default":
                return ast.unparse(kw.value), None
            if kw.arg == "default_factory":
                factory = kw.value.body if isinstance(kw.value, ast.Lambda) else kw.value
                if isinstance(factory, ast.Name):  # field(default_factory=SomeConfig)
                    return f"{factory.id}()", ast.Call(func=factory, args=[], keywords=[])
                return ast.unparse(factory), factory if isinstance(factory, ast.Call) else None
        return "(required)", None
    return ast.unparse(value), None


def _class_keys(sources: _Sources, path: Path, cls: ast.ClassDef, prefix: str, overrides: dict[str, str]) -> list[Key]:
    keys = []
    for base in cls.bases:  # a dataclass's fields start with its bases' fields
        if isinstance(base, ast.Name) and (found := sources.find_class(path, base.id)) and _is_dataclass_def(found[1]):
            keys += _class_keys(sources, *found, prefix, overrides)
    for i, node in enumerate(cls.body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name, annotation = node.target.id, ast.unparse(node.annotation)
        if annotation.startswith(("ClassVar", "typing.ClassVar")):
            continue
        if isinstance(node.value, ast.Call) and any(kw.arg == "init" for kw in node.value.keywords):
            continue  # field(init=False): not a config key
        default, builder = _default(node.value)
        default, literal = _as_yaml(overrides.get(name, default))
        nested = sources.find_class(path, annotation) if annotation.isidentifier() else None
        if nested is not None and _is_dataclass_def(nested[1]):
            inner = {kw.arg: ast.unparse(kw.value) for kw in builder.keywords if kw.arg} if builder else {}
            keys += _class_keys(sources, *nested, f"{prefix}{name}.", inner)
        else:
            keys.append(Key(prefix + name, annotation, default, _docstring_after(cls.body, i), literal))
    # A dataclass may redefine a base's field; the last definition is the one that counts.
    return list({key.name: key for key in keys}.values())


def config_keys(path: str | Path | None, class_name: str = "JobConfig") -> tuple[str, list[Key]]:
    """(class docstring, every key of dataclass `class_name` in the source file `path`, nested dataclasses expanded
    into dotted keys), read with `ast`: nothing is imported but the packages that hold the nested classes.
    ('', []) when there is no such source (a class defined in an interactive session)."""
    if path is None or not Path(path).is_file():
        return "", []
    sources = _Sources()
    found = sources.find_class(Path(path), class_name)
    if found is None or not _is_dataclass_def(found[1]):
        return "", []
    return ast.get_docstring(found[1]) or "", _class_keys(sources, *found, "", {})


# ---------------------------------------------------------------------------------------------------------------
# The parser of a job


def _keys_text(keys: list[Key]) -> str:
    lines = ["config keys (set any with key=value; nested keys are dotted):"]
    for key in keys:
        lines.append(f"  {key.name}: {key.type} = {key.default}")
        if key.doc:
            lines.append(f"      {key.doc}")
    return "\n".join(lines)


def _example(keys: list[Key]) -> str:
    """A real `key=value` override for the help text (a learning rate, a step count, a number), at its default."""
    numbers = [k for k in keys if k.type in ("int", "float") and k.default.lstrip("-").replace(".", "", 1).isdigit()]
    for suffix in ("lr", "max_steps", ""):  # what people override most, then any nested number
        pick = next((k for k in numbers if k.name.endswith(suffix) and "." in k.name), None)
        if pick:
            break
    pick = pick or (numbers[0] if numbers else (keys[0] if keys else None))
    return f"{pick.name}={pick.default}" if pick else "key=value"


def job_parser(job: str, source: str | Path | None, class_name: str = "JobConfig", description: str = "",
               config_required: bool = True) -> argparse.ArgumentParser:
    """The argument parser of `python -m <job>`: `--config FILE [--force] [--print-config] [key=value ...]`, with
    every config key of the job's dataclass in its `--help`."""
    doc, keys = config_keys(source, class_name)
    parser = argparse.ArgumentParser(prog=f"python -m {job}", description=description or doc,
                                     epilog=_keys_text(keys) if keys else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=config_required, metavar="FILE",
                        help="YAML config for this job (configs/.../*.yaml)")
    parser.add_argument("--force", action="store_true", help="rerun even if the outputs exist for this config")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (after overrides) as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"set a config key, nested keys dotted (e.g. {_example(keys)})")
    return parser


def before_imports() -> None:
    """Call first thing in a job module run as a command (see the module docstring): quiets `KNOWN_NOISE` and, when
    the command line asks for `--help`, prints it from the module's source and exits, before torch is imported."""
    quiet_third_party_logs()
    main = sys.modules["__main__"]
    if not {"-h", "--help"} & set(sys.argv[1:]):
        return
    spec = getattr(main, "__spec__", None)
    job = spec.name if spec is not None else Path(sys.argv[0]).stem
    job_parser(job, main.__file__).parse_args()  # prints the help and exits 0


# ---------------------------------------------------------------------------------------------------------------
# Running a command


def run(main: Callable[[], Any]) -> NoReturn:
    """Run a command's `main()` and exit with its status (an int it returns, else 0). A config or data problem (the
    message names file, entry, problem and fix) ends it with that message on stderr and exit status 2 (config) or
    1 (data), not a traceback; any other exception is a bug and keeps its traceback."""
    from common.annotations import DataError
    from common.audio import AudioError
    from common.errors import ConfigError

    quiet_third_party_logs()
    try:
        result = main()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except (DataError, AudioError) as err:
        print(f"data error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(result if isinstance(result, int) else 0)
