"""The import graph follows the layout's two rules (README, "Layout"):

(a) no module imports a recipe (a module that defines `main` and ends by running it: `run(main)` or
    `if __name__ == "__main__"`): not another recipe, and not a library module either, which would make every recipe
    that uses the library depend on that recipe. Shared code lives in library modules; only a package's
    `__main__` routes a subcommand to the recipe that runs it;
(b) arrows run forward through the pipeline: a module imports its own package or a package earlier in `STAGES`;
(c) no import cycles between modules (two modules that need each other are one room, or share a third below both).

Every `.py` under the top-level packages is parsed with `ast`; imports inside functions count as much as the ones at
the top of a module (a local import hides a dependency, it does not remove it)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The pipeline's order. A module may import its own package or any package on an earlier (lower) rung.
STAGES: dict[str, int] = {
    "common": 0,  # config, data, loop, model interface, stage state, metrics, device: what every stage shares
    "toybench": 1,
    "convert": 1,
    "teacher": 2,
    "student": 3,
    "distill": 4,
    "prune": 5,
    "scale": 6,
    "evaluation": 7,
    "experiments": 8,
}

# Imports that break a rule today, each with why it is still there. The test also fails when an entry no longer
# occurs, so this list can only shrink.
KNOWN_VIOLATIONS: dict[str, str] = {}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path) -> dict[str, Path]:
    """Every module under the top-level packages: dotted name → file."""
    return {module_name(path, root): path for package in STAGES for path in sorted((root / package).rglob("*.py"))}


def is_recipe(tree: ast.Module) -> bool:
    """A module that defines `main` at its top level and whose last statement runs it (`run(main)`, or an
    `if __name__ == "__main__":` block)."""
    defines_main = any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body)
    if not defines_main or not tree.body:
        return False
    last = ast.unparse(tree.body[-1])
    return "__name__" in last or "run(main" in last


def imported_modules(tree: ast.Module, name: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that `tree` imports anywhere (top level or inside functions), resolved to the module that
    holds the name: `from a.b import c` is `a.b.c` when that is a module, else `a.b`."""

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: count the dots up from this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in STAGES and (module := resolve(target)) and module != name:
                found.add(module)
    return found


def violations(root: Path) -> set[str]:
    """Each broken rule as `importer -> imported (rule)`."""
    modules = package_modules(root)
    trees = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in modules.items()}
    recipes = {name for name, tree in trees.items() if is_recipe(tree)}
    edges = {
        name: imported_modules(tree, name, modules[name].name == "__init__.py", modules) for name, tree in trees.items()
    }
    closure = {name: reachable(name, edges) for name in trees}
    found = set()
    for name in trees:
        for target in edges[name]:
            # A package's `__main__` only routes a subcommand to the recipe that runs it (`python -m experiments
            # ablation`): routing to recipes is its job, not a recipe driving another.
            if target in recipes and not name.endswith(".__main__"):
                found.add(f"{name} -> {target} (imports a recipe)")
            if STAGES[target.split(".")[0]] > STAGES[name.split(".")[0]]:
                found.add(f"{name} -> {target} (backward arrow)")
            if name in closure[target]:
                found.add(f"{name} -> {target} (import cycle)")
    return found


def reachable(start: str, edges: dict[str, set[str]]) -> set[str]:
    """Every module that `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for target in edges.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_recipes_are_found_by_walking_the_tree():
    recipes = {name for name, path in package_modules(REPO).items() if is_recipe(ast.parse(path.read_text()))}
    # A few that the README's commands run; the walk must find them without a hand-written list.
    assert {"teacher.train", "distill.train", "prune.structured", "evaluation.run"} <= recipes
    assert "common.config" not in recipes


def test_the_check_catches_both_kinds_of_violation(tmp_path):
    """The rules fire on a tiny tree: a recipe importing another (inside a function), and a backward arrow."""
    recipe = 'from common.cli import run\n\n\ndef main():\n    {body}\n\n\nif __name__ == "__main__":\n    run(main)\n'
    for package in ("common", "teacher", "distill"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "common" / "cli.py").write_text("def run(main):\n    main()\n")
    (tmp_path / "teacher" / "train.py").write_text(recipe.format(body="from distill.losses import kl  # noqa"))
    (tmp_path / "distill" / "losses.py").write_text("def kl():\n    return 0\n")
    (tmp_path / "distill" / "train.py").write_text(recipe.format(body="from teacher.train import main as t"))
    (tmp_path / "common" / "a.py").write_text("def f():\n    from common.b import g\n")
    (tmp_path / "common" / "b.py").write_text("from common import a\n")
    assert violations(tmp_path) == {
        "common.a -> common.b (import cycle)",
        "common.b -> common.a (import cycle)",
        "teacher.train -> distill.losses (backward arrow)",
        "distill.train -> teacher.train (imports a recipe)",
    }


def test_imports_follow_the_layout():
    found = violations(REPO)
    new = sorted(found - set(KNOWN_VIOLATIONS))
    gone = sorted(set(KNOWN_VIOLATIONS) - found)
    message = []
    if new:
        message.append(
            "imports that break the layout (nothing imports a recipe; arrows run forward through "
            f"{' → '.join(STAGES)}): move the shared code into a library module at or below both:\n  "
            + "\n  ".join(new)
        )
    if gone:
        message.append("fixed, so remove them from KNOWN_VIOLATIONS in tests/test_layout.py:\n  " + "\n  ".join(gone))
    if message:
        pytest.fail("\n".join(message))
