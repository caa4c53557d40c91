"""A teacher folder from the official SALMONN checkpoints, without copying a weight.

    python -m teacher.assemble --config configs/salmonn13b-gemma2b/teacher.yaml [--force] [key=value ...]

Every later stage (teacher cache, distillation, evaluation) loads its teacher from a folder in the layout that
`teacher.train` writes: `whisper/`, `beats.pt`, `llm/`, `salmonn.pth` and `salmonn.yaml`. For the released SALMONN
that folder is made of symbolic links to the four official sources (one link per file, so the teacher cache's
identity check sees every file's size and time) and the `salmonn.yaml` that loads them. With `verify` the teacher
is then loaded once through the same loader (`teacher.checkpoint.load_model_folder`), which fails unless every
trained key of the SALMONN checkpoint fits the configured architecture.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: answer --help from the source, quiet known noise
    from common.cli import before_imports

    before_imports()

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import run
from common.config import parse_cli
from common.hub import local_folder
from common.stages import mark_stage_done, stage_is_current
from teacher.build import CheckpointError, SalmonnConfig
from teacher.checkpoint import load_model_folder, write_model_config


@dataclass
class JobConfig:
    """Link the official SALMONN checkpoints into a teacher folder."""

    model: SalmonnConfig = field(default_factory=SalmonnConfig)
    """The SALMONN teacher; every path must exist (relative paths resolve against the working directory)."""
    output_dir: str = "outputs/salmonn13b-gemma2b/teacher"
    """The teacher folder is `output_dir/model`."""
    verify: bool = True
    """Load the assembled teacher once on the CPU and check the checkpoint's keys (SALMONN-13B: about 30 GB of RAM
    and a few minutes)."""


def check_sources(cfg: SalmonnConfig) -> dict[str, Path]:
    """The four sources as absolute paths (Whisper and the LLM may be hub ids); a missing one stops the run naming
    its key and what belongs there."""
    wanted = {"whisper": (cfg.whisper.path, "model.whisper.path", "a Hugging Face Whisper folder", "config.json"),
              "llm": (cfg.llm.path, "model.llm.path", "a Hugging Face LLM folder with its tokenizer", "config.json"),
              "checkpoint": (cfg.checkpoint, "model.checkpoint", "the SALMONN .pth release", None)}
    if cfg.beats.enabled:
        wanted["beats"] = (cfg.beats.path, "model.beats.path", "the official BEATs .pt", None)
    sources = {}
    for name, (path, key, what, inside) in wanted.items():
        if not path:
            raise CheckpointError(f"{key} is empty: set it to {what}")
        # Hub ids (whisper, llm) resolve to their snapshot in the hub cache, whose files are linked like any folder's.
        folder, hub_note = local_folder(path) if inside else (Path(path), "")
        source = folder.resolve()
        ok = (source / inside).is_file() if inside else source.is_file()
        if not ok:
            raise CheckpointError(f"{key}: {path} is not {what}" + (f" (no {inside})" if inside else "")
                                  + f"; put it there (see README, 'Real scale') or override {key}=..." + hub_note)
        sources[name] = source
    return sources


def link_folder(source: Path, target: Path) -> None:
    """`target/` as a real folder holding one symbolic link per entry of `source/`."""
    target.mkdir(parents=True)
    for entry in sorted(source.iterdir()):
        (target / entry.name).symlink_to(entry.resolve())


def assemble(cfg: SalmonnConfig, folder: Path) -> Path:
    """Write the teacher folder `folder` (replacing it) from the sources in `cfg`."""
    sources = check_sources(cfg)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    link_folder(sources["whisper"], tmp / "whisper")
    link_folder(sources["llm"], tmp / "llm")
    (tmp / "salmonn.pth").symlink_to(sources["checkpoint"])
    if "beats" in sources:
        (tmp / "beats.pt").symlink_to(sources["beats"])
    write_model_config(cfg, tmp, beats="beats" in sources)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    cfg, force = parse_cli(JobConfig, argv)
    folder = Path(cfg.output_dir) / "model"
    if stage_is_current(cfg, folder) and not force:
        print(f"teacher folder up to date: {folder} (use --force to rebuild)")
        return 0
    try:
        assemble(cfg.model, folder)
        if cfg.verify:
            load_model_folder(folder)  # raises unless every trained key of the checkpoint fits
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    mark_stage_done(cfg, folder)
    print(f"teacher folder: {folder}" + (" (loaded and checked)" if cfg.verify else ""))
    return 0


if __name__ == "__main__":
    run(main)
