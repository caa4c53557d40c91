"""The repository itself: a clone stands alone, so no tracked file outside tests holds a path of one machine (its home
folder, its temporary folder) and no build output is tracked."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A home folder (/root/..., /home/<user>/...) or the temporary folder (/tmp/...) written as an absolute path.
MACHINE_PATH = re.compile(r"(?<![\w.~-])(/root/|/home/[a-z_][\w-]*/|/tmp/)")


def tracked_files() -> list[str]:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing is tracked")
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    return [name for name in listing.stdout.decode().split("\0") if name]


def test_the_pattern_finds_machine_paths_and_leaves_relative_ones():
    for text in ("see /root/.cache/smolt", "cd /home/ana/smolt", "output_dir=/tmp/p0/pruned"):
        assert MACHINE_PATH.search(text), text
    for text in ("~/.cache/smolt", "outputs/tmp/x", "runs/quick/student", "a/home/b"):
        assert not MACHINE_PATH.search(text), text


def test_no_tracked_file_outside_tests_holds_an_absolute_machine_path():
    found = []
    for name in tracked_files():
        path = REPO / name
        if name.startswith("tests/") or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary (figures, fixtures)
        for number, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not found, "write a relative path or the setting's name instead:\n" + "\n".join(found)


def test_no_build_output_is_tracked():
    built = [name for name in tracked_files() if re.search(r"(^|/)(build/lib|dist)/|\.egg-info/|__pycache__/", name)]
    assert not built, built
