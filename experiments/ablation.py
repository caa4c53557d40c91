"""The ablation table: every row a chain of pipeline stages, every cell a mean ± std over seeds.

    python -m experiments ablation --config configs/toy/ablation.yaml [only='["+ forward KL"]']
    python -m experiments ablation --config configs/toy/ablation.yaml status=true   # what is done, what is left
    bash scripts/ablation.sh                       # the same, for the toy preset

A row lists the stages that make its model, each a config of the preset (`distill` is
`configs/<preset>/distill.yaml`) with `key=value` overrides, where `{prev}` stands for the previous stage's output
(a model folder, a cache, a data file). Each stage runs as its own process, exactly as `scripts/distill.sh` runs
it, in a folder named by a hash of everything that determines its result (job, base config text, overrides,
inputs, seed, and the teacher folder's files, so a retrained teacher reruns everything): rows that share a stage
share its run, and a row finished earlier is reused, not rerun; with `reuse_from`, a stage another table finished
is adopted (copied), not rerun. The model is then scored by `evaluation.run`, with the teacher measured in the same
process as the reference of the efficiency ratios. `jobs=2` runs two row seeds at a time.

Outputs: `<table_dir>/<table_name>.{md,csv,tex}` (each row with the command that reproduces it),
`<table_dir>/<table_name>_commands.md` (every stage command of every row and seed),
`<table_dir>/<table_name>_rows.json` (the table's per-seed values, kept beside it so that its figures can be drawn
again from a clone, where `output_dir` is empty) and `<output_dir>/rows.json` (every row run into that folder).
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: answer --help from the source, quiet known noise
    from common.cli import before_imports

    before_imports()

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from common.cli import run
from common.config import ConfigError, config_hash, load_job_config, parse_cli, read_yaml, save_resolved
from common.stages import ABLATION_DONE, DONE, input_stamp, is_marked, stage_lock, write_marker
from common.tracking import LOG_OWNER
from experiments.ablation_config import STAGE_IO, JobConfig, Row, StageRun
from experiments.table import QUALITY, RATIOS, write_tables


def teacher_identity(folder: str) -> str:
    """`teacher.cache_identity.teacher_identity`, imported on first use: it pulls in torch and transformers, which
    `python -m experiments compare|figures` (and `--help`) never need."""
    from teacher.cache_identity import teacher_identity as identity

    return identity(folder)


def _digest(*parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _inputs(overrides: list[str]) -> list[str]:
    """`common.stages.input_stamp` of the existing files and folders that literal `key=path` overrides name, so a
    stage started from a model outside the ablation (`model=outputs/toy/student/model`) reruns when it changes."""
    paths = [item.partition("=")[2] for item in overrides]
    return [input_stamp(path) for path in paths if path and Path(path).exists()]


def stage_job(cfg: JobConfig, stage: StageRun) -> tuple[str, Path]:
    path = Path(cfg.configs_root) / cfg.preset / f"{stage.config}.yaml"
    if not path.is_file():
        raise SystemExit(f"ablation config: stage config '{stage.config}' → {path} does not exist; name a file of "
                         f"{path.parent}/ without .yaml")
    job = read_yaml(path).get("job", "")
    if job not in STAGE_IO:
        raise SystemExit(f"ablation config: {path} runs job '{job}', which the ablation cannot chain; known jobs: "
                         f"{', '.join(sorted(STAGE_IO))} (add it to experiments.ablation.STAGE_IO)")
    return job, path


@dataclass
class PlannedStage:
    job: str
    config: Path
    overrides: list[str]
    output_dir: Path
    produces: Path

    @property
    def command(self) -> list[str]:
        return ["python", "-m", self.job, "--config", str(self.config), *self.overrides]


def plan_row(cfg: JobConfig, row: Row, seed: int) -> tuple[list[PlannedStage], Path]:
    """The stages of one row and seed, with their folders, and the path of the model they end in."""
    if row.path:
        if row.stages:
            raise SystemExit(f"ablation config: row '{row.name}' has both `path` and `stages`; give one")
        return [], Path(row.path)
    if not row.stages:
        raise SystemExit(f"ablation config: row '{row.name}' has neither `stages` nor `path`")
    planned: list[PlannedStage] = []
    prev: Path | None = None
    for i, stage in enumerate(row.stages):
        job, path = stage_job(cfg, stage)
        io = STAGE_IO[job]
        overrides = []
        literal = [item for item in stage.overrides if "{prev}" not in item]
        for item in stage.overrides:
            if "{prev}" in item:
                if prev is None:
                    raise SystemExit(f"ablation config: row '{row.name}' stage {i} ({stage.config}) uses {{prev}} "
                                     "but is the first stage")
                item = item.replace("{prev}", str(prev))
            overrides.append(item)
        if stage.seeded and io.seed_key:
            overrides.append(f"{io.seed_key}={seed}")
        key = _digest(job, path.read_text(), overrides, teacher_identity(cfg.teacher.path), *_inputs(literal))
        out = Path(cfg.output_dir) / "stages" / f"{stage.config}-{key}"
        overrides = [*overrides, f"output_dir={out}"]
        if job in ("distill.train",):
            overrides.append(f"log_dir={Path(cfg.runs_dir) / out.name}")
        produces = out / io.output if io.output else out
        planned.append(PlannedStage(job, path, overrides, out, produces))
        prev = produces
    return planned, prev


def run_logged(command: list[str], log: Path, what: str) -> None:
    """Run one stage process, its output to `log`; on failure stop with the command and the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, *command[1:]] if command[0] == "python" else command
    with open(log, "w") as f:
        code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"ablation: {what} failed (exit {code})\n  command: {shlex.join(command)}\n  log: {log}\n"
                         f"{tail}")


def plan_eval(cfg: JobConfig, row: Row, model: Path, is_teacher: bool) -> tuple[Path, list[str]]:
    """The folder and command of one model's evaluation (its key needs the model's files: plan it once they exist)."""
    eval_config = Path(cfg.configs_root) / cfg.preset / "evaluate.yaml"
    if is_teacher:
        models = [{"name": "model", "loader": row.loader, "path": str(model)}]
    else:
        models = [{"name": "teacher", "loader": cfg.teacher.loader, "path": cfg.teacher.path, "quality": False},
                  {"name": "model", "loader": row.loader, "path": str(model)}]
    key = _digest(eval_config.read_text(), models, cfg.evaluate, teacher_identity(cfg.teacher.path),
                  teacher_identity(str(model)) if Path(model).is_dir() else "")
    out = Path(cfg.output_dir) / "eval" / key
    command = ["python", "-m", "evaluation.run", "--config", str(eval_config), f"models={json.dumps(models)}",
               *cfg.evaluate, f"output_dir={out}"]
    return out, command


def evaluate_model(cfg: JobConfig, row: Row, model: Path, is_teacher: bool) -> tuple[dict, dict, list[str]]:
    """Score one model (quality, and efficiency against the teacher in the same process): (results, ratios, cmd)."""
    out, command = plan_eval(cfg, row, model, is_teacher)
    if not is_marked(out, shlex.join(command), DONE):
        run_logged(command, out.with_suffix(".log"), f"evaluation of '{row.name}' ({model})")
        write_marker(out, shlex.join(command), DONE)
    results = json.loads((out / "model" / "results.json").read_text())
    ratios = json.loads((out / "comparison.json").read_text())["ratios"]["model"]
    return results, ratios, command


def row_seeds(cfg: JobConfig, row: Row) -> list[int]:
    """The row's own seeds, else the table's; a finished model (no stages) has nothing to reseed: one run."""
    seeds = row.seeds or cfg.seeds
    return seeds if row.stages else seeds[:1]


def is_teacher_row(cfg: JobConfig, row: Row) -> bool:
    return not row.stages and Path(row.path).resolve() == Path(cfg.teacher.path).resolve()


def report_status(cfg: JobConfig, rows: list[Row]) -> dict[str, int]:
    """Print, per row and seed, which stages and evaluations are finished, started (a folder without the finished
    marker: its training resumes from the last checkpoint) or still to run; runs nothing. Returns the counts."""
    counts = dict.fromkeys(("stages", "stages_done", "stages_started", "evals", "evals_done"), 0)
    seen: set[Path] = set()  # a stage shared by rows or seeds is one run: count it once
    rows_json = Path(cfg.output_dir) / "rows.json"
    tabulated = json.loads(rows_json.read_text()) if rows_json.is_file() else {}
    for row in rows:
        seeds = row_seeds(cfg, row)
        print(f"=== {row.name}" + ("  (in rows.json with seeds "
                                    f"{[s['seed'] for s in tabulated[row.name]['seeds']]})" if row.name in tabulated
                                    else ""))
        for seed in seeds:
            planned, model = plan_row(cfg, row, seed)
            states = []
            for stage in planned:
                if is_marked(stage.output_dir, shlex.join(stage.command), ABLATION_DONE):
                    state = "done"
                elif stage.output_dir.exists():
                    state = "started"
                elif (source := adoptable(cfg, stage)) is not None:
                    state = f"done in {source.parent.parent} (adopted when run)"
                else:
                    state = "to run"
                states.append(f"{stage.output_dir.name} {state}")
                if stage.output_dir not in seen:
                    seen.add(stage.output_dir)
                    counts["stages"] += 1
                    counts["stages_done"] += state.startswith("done")
                    counts["stages_started"] += state == "started"
            counts["evals"] += 1
            evaluated = False
            if Path(model).exists():
                out, command = plan_eval(cfg, row, Path(model), is_teacher_row(cfg, row))
                evaluated = is_marked(out, shlex.join(command), DONE)
            counts["evals_done"] += evaluated
            states.append("evaluation " + ("done" if evaluated else "to run"))
            print(f"  seed {seed}: " + " · ".join(states))
    print(f"stages: {counts['stages_done']} of {counts['stages']} done, {counts['stages_started']} started; "
          f"evaluations: {counts['evals_done']} of {counts['evals']} done")
    return counts


def _split_paths(command: list[str]) -> tuple[list[str], list[str]]:
    """A stage command without its `output_dir=` and `log_dir=` overrides (which name the folder, not the result),
    and those two."""
    where = ("output_dir=", "log_dir=")
    return ([a for a in command if not a.startswith(where)], [a for a in command if a.startswith(where)])


def adoptable(cfg: JobConfig, stage: PlannedStage) -> Path | None:
    """The first finished folder of this very stage in one of `cfg.reuse_from`, if any."""
    for other in cfg.reuse_from:
        source = Path(other) / "stages" / stage.output_dir.name
        marker = source / ABLATION_DONE
        if source.resolve() != stage.output_dir.resolve() and marker.is_file() and \
                _split_paths(shlex.split(marker.read_text()))[0] == _split_paths(stage.command)[0]:
            return source
    return None


def adopt(stage: PlannedStage, source: Path) -> None:
    """Copy a finished stage folder of another table into `stage.output_dir`, with its log and TensorBoard folder,
    and point its bookkeeping here: every `config.yaml` the job wrote is written again for this folder's resolved
    config, and every `DONE` marker gets that config's hash (the input stamps after it stay: same inputs)."""
    source_command = shlex.split((source / ABLATION_DONE).read_text())
    source_paths = _split_paths(source_command)[1]
    source_cfg = load_job_config(stage.config, source_command[5:])
    mine = load_job_config(stage.config, stage.overrides)
    old_hash, new_hash = config_hash(source_cfg), config_hash(mine)
    tmp = stage.output_dir.with_name(stage.output_dir.name + f".adopting-{os.getpid()}")
    shutil.copytree(source, tmp)
    for path in tmp.rglob("config.yaml"):
        if path.read_text().startswith(f"# resolved config, hash {old_hash}\n"):
            save_resolved(mine, path.parent)
    for path in tmp.rglob(DONE):
        parts = path.read_text().split()
        if parts and parts[0] == old_hash:
            write_marker(path.parent, " ".join([new_hash, *parts[1:]]), DONE)
    if source.with_suffix(".log").is_file():
        shutil.copy2(source.with_suffix(".log"), stage.output_dir.with_suffix(".log"))
    source_logs = next((a.partition("=")[2] for a in source_paths if a.startswith("log_dir=")), "")
    my_logs = next((a.partition("=")[2] for a in stage.command if a.startswith("log_dir=")), "")
    if source_logs and my_logs and Path(source_logs).is_dir() and not Path(my_logs).exists():
        shutil.copytree(source_logs, my_logs)
        for owner in Path(my_logs).rglob(LOG_OWNER):  # it names the source's output folder, not this one: the copies
            owner.unlink()  # are unclaimed, kept by a resume here and moved aside (not deleted) by a fresh start
    (tmp / "ADOPTED_FROM").write_text(f"{source}\n")
    write_marker(tmp, shlex.join(stage.command), ABLATION_DONE)
    tmp.rename(stage.output_dir)


def _lock(cfg: JobConfig, path: Path):
    """`common.stages.stage_lock` of one stage folder or model under `<output_dir>/locks/`: two row seeds that share
    a stage (the pruning rows start from the recipe's students) wait for each other, and the second reuses what the
    first made, whether they run in threads of one process (`jobs`) or in two processes (`only=`)."""
    return stage_lock(Path(cfg.output_dir) / "locks", path)


def run_seed(cfg: JobConfig, row: Row, seed: int) -> dict:
    """One seed of one row: run its stages (reusing or adopting finished ones), score the model."""
    planned, model = plan_row(cfg, row, seed)
    for stage in planned:
        with _lock(cfg, stage.output_dir):
            if is_marked(stage.output_dir, shlex.join(stage.command), ABLATION_DONE):
                print(f"  [{row.name} | seed {seed}] reuse {stage.output_dir}", flush=True)
            elif not stage.output_dir.exists() and (source := adoptable(cfg, stage)) is not None:
                print(f"  [{row.name} | seed {seed}] adopt {source} → {stage.output_dir}", flush=True)
                adopt(stage, source)
            else:
                print(f"  [{row.name} | seed {seed}] {shlex.join(stage.command)}", flush=True)
                run_logged(stage.command, stage.output_dir.with_suffix(".log"), f"row '{row.name}' seed {seed}")
                write_marker(stage.output_dir, shlex.join(stage.command), ABLATION_DONE)
    with _lock(cfg, model):
        results, ratios, eval_command = evaluate_model(cfg, row, model, is_teacher=is_teacher_row(cfg, row))
    values = {k: results.get(k) for k in QUALITY}
    values.update({f"{k}_ratio": ratios.get(k) for k in RATIOS})
    values.update({k: results.get(k) for k in RATIOS})
    return {"values": {"seed": seed, "model": str(model), **values},
            "commands": {"seed": seed, "stages": [shlex.join(s.command) for s in planned],
                         "evaluate": shlex.join(eval_command)},
            "unavailable": results.get("unavailable", {})}


def assemble_row(row: Row, seeds: list[dict]) -> dict:
    """The row's entry of rows.json from its seeds' results (in seed order)."""
    unavailable = seeds[-1]["unavailable"] if seeds else {}
    return {"name": row.name, "tags": row.tags, "seeds": [s["values"] for s in seeds],
            "commands": [s["commands"] for s in seeds],
            "unavailable": {k: unavailable[k] for k in QUALITY if k in unavailable}}


def run_row(cfg: JobConfig, row: Row) -> dict:
    """Every seed of one row, one after the other."""
    return assemble_row(row, [run_seed(cfg, row, seed) for seed in row_seeds(cfg, row)])


def run_parallel(cfg: JobConfig, rows: list[Row], record) -> None:
    """Every seed of every row, `cfg.jobs` at a time (threads, each stage its own process); `record(row_result)` as
    each row's last seed ends. A failure lets the running seeds finish, starts no more, and is raised at the end."""
    if "OMP_NUM_THREADS" not in os.environ:  # the stage processes inherit it: share the cores, don't oversubscribe
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.jobs))
    done: dict[str, dict[int, dict]] = {row.name: {} for row in rows}
    failure: BaseException | None = None
    with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
        futures = {pool.submit(run_seed, cfg, row, seed): (row, seed) for row in rows for seed in row_seeds(cfg, row)}
        for future in as_completed(futures):
            row, seed = futures[future]
            try:
                done[row.name][seed] = future.result()
            except BaseException as err:  # a stage's SystemExit too: raised once the running seeds end
                failure = failure or err
                for other in futures:
                    other.cancel()
                continue
            seeds = row_seeds(cfg, row)
            if len(done[row.name]) == len(seeds):
                record(assemble_row(row, [done[row.name][s] for s in seeds]))
    if failure is not None:
        raise failure


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, _ = parse_cli(JobConfig, argv, config_required=True)  # a table never runs on defaults nobody chose
    if not cfg.config_path and "--config" in argv:
        cfg.config_path = argv[argv.index("--config") + 1]
    names = [row.name for row in cfg.rows]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates or not all(names):
        raise SystemExit(f"ablation config: every row needs a unique `name` (repeated: {duplicates})")
    unknown = [n for n in cfg.only if n not in names]
    if unknown:
        raise SystemExit(f"ablation: only={unknown} names no row; rows: {names}")
    rows = [row for row in cfg.rows if not cfg.only or row.name in cfg.only]
    for row in rows:  # plan and check everything first, so a typo in the last row stops before hours of work
        for stage in plan_row(cfg, row, cfg.seeds[0])[0]:
            try:
                load_job_config(stage.config, stage.overrides)
            except ConfigError as err:
                raise SystemExit(f"ablation config: row '{row.name}', stage {stage.config.stem}: {err}") from None
    if cfg.status:
        report_status(cfg, rows)
        return 0
    if cfg.jobs < 1:
        raise SystemExit(f"ablation config: jobs={cfg.jobs}; give 1 (one seed at a time) or more")
    done_path = Path(cfg.output_dir) / "rows.json"

    def record(result: dict) -> None:
        # Read just before writing: another ablation process (other rows, `only=`) may have finished rows meanwhile.
        previous = json.loads(done_path.read_text()) if done_path.is_file() else {}
        previous[result["name"]] = result
        done_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = done_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(previous, indent=1) + "\n")
        tmp.replace(done_path)  # whole or not at all, for the other process reading it
        print(f"=== row done: {result['name']}", flush=True)

    if cfg.jobs > 1:
        run_parallel(cfg, rows, record)
    else:
        for row in rows:
            print(f"=== row: {row.name}", flush=True)
            record(run_row(cfg, row))
    previous = json.loads(done_path.read_text()) if done_path.is_file() else {}
    table_rows = [previous[n] for n in names if n in previous]  # the whole table, in config order
    missing = [n for n in names if n not in previous]
    if missing:
        print(f"ablation: the table lacks {len(missing)} of its {len(names)} rows, not run yet: {missing}")
    for path in write_tables(cfg, table_rows, missing):
        print(f"wrote {path}")
    print(Path(cfg.table_dir, f"{cfg.table_name}.md").read_text())
    return 0


if __name__ == "__main__":
    run(main)
