"""The ablation table's config: its rows, each a chain of stage configs with overrides, and how the runner chains
the stage jobs (`STAGE_IO`). `experiments.ablation` runs it; `experiments.figures` reads its rows' tags and folders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


@dataclass(frozen=True)
class StageIO:
    """How the runner drives one stage job: where its seed goes and what `{prev}` means after it."""

    seed_key: str | None
    """Dotted config key that takes the row's seed (None: the job has no randomness of its own)."""
    output: str
    """Path under the job's `output_dir` of what the next stage consumes ('' = the folder itself)."""


STAGE_IO = {
    "distill.train": StageIO("loop.seed", "model"),
    "distill.sequence_kd": StageIO(None, "train.json"),
    "teacher.cache": StageIO("seed", ""),
    "prune.structured": StageIO("seed", "model"),
    "prune.quantize": StageIO(None, "model"),
}


@dataclass
class StageRun:
    config: str = ""
    """A stage config of the preset by name: `distill` runs `configs/<preset>/distill.yaml`."""
    overrides: list[str] = field(default_factory=list)
    """`key=value` overrides for that config; `{prev}` is replaced by the previous stage's output."""
    seeded: bool = True
    """Give this stage the row's seed; false runs it once for all seeds (e.g. a teacher cache)."""


@dataclass
class Row:
    name: str = ""
    stages: list[StageRun] = field(default_factory=list)
    """The stages that produce the row's model, in order; empty when `path` names a finished model."""
    path: str = ""
    """A finished model folder (the teacher's row); used instead of stages."""
    loader: str = "student.build:load_student_folder"
    """`module:function` that loads the row's final model for evaluation."""
    seeds: list[int] = field(default_factory=list)
    """This row's seeds, when it needs other ones than the table's `seeds` (e.g. more, to settle a close call)."""
    tags: dict[str, float] = field(default_factory=dict)
    """What the figures plot the row against: `keep_ratio` (BEATs tokens kept), `prune_ratio` and `recovery`
    (0/1), `int8` (0/1)."""


@dataclass
class TeacherRef:
    path: str = "outputs/toy/teacher/model"
    loader: str = "teacher.checkpoint:load_model_folder"


@dataclass
class JobConfig:
    """Run the ablation rows, score them, write the table."""

    job: ClassVar[str] = "experiments.ablation"
    """The command that runs this config (its YAML's `job:`); `experiments.figures` reads the same YAML."""

    preset: str = "toy"
    """Stage configs come from `configs/<preset>/`."""
    configs_root: str = "configs"
    teacher: TeacherRef = field(default_factory=TeacherRef)
    """The reference of every efficiency ratio, measured in each row's evaluation process."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    rows: list[Row] = field(default_factory=list)
    evaluate: list[str] = field(default_factory=list)
    """Overrides for `configs/<preset>/evaluate.yaml` in every row's evaluation (e.g. `max_clips_per_task=100`)."""
    only: list[str] = field(default_factory=list)
    """Run and tabulate only these rows (by name); empty = all."""
    reuse_from: list[str] = field(default_factory=list)
    """`output_dir`s of other tables of the preset whose finished stages this one adopts instead of training them
    again: a stage folder there with this stage's name (the same job, config text, overrides, seed, teacher and
    inputs) and a finished marker is copied in, weights byte for byte, its bookkeeping pointed at this folder and an
    `ADOPTED_FROM` file written. Safe because a stage's result is a function of its name: training is deterministic
    on one machine (a rerun gives the same weights, bit for bit)."""
    jobs: int = 1
    """Row seeds run at once, each stage its own process (`jobs=2` on 2 cores: two one-thread trainings; the stage
    processes get OMP_NUM_THREADS = cores / jobs unless it is set). Seeds that share a stage wait for one run of
    it. The efficiency ratios are then measured beside another job: noisier."""
    status: bool = False
    """Print what is finished, started and still to run for every row and seed, then stop without running
    anything (for a table that takes hours: what is left, after an interruption or on another machine)."""
    output_dir: str = "outputs/toy/ablation"
    runs_dir: str = "runs/toy/ablation"
    """TensorBoard logs of every training stage: `<runs_dir>/<stage folder name>/`."""
    table_dir: str = "paper/tables"
    table_name: str = "ablation"
    config_path: str = ""
    """Set by the runner to the YAML it was started with (for the commands it prints); leave empty."""
