"""common.stages: one marker format for every kind of finished folder, and stamps that see content, not bookkeeping."""

import os

from common.stages import (
    ABLATION_DONE,
    DONE,
    EVALUATED,
    clear_marker,
    input_stamp,
    is_marked,
    write_marker,
)


def test_a_stamp_changes_with_the_weights_not_with_the_markers(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.safetensors").write_bytes(b"\0" * 8)
    before = input_stamp(model)
    for marker in (DONE, EVALUATED, ABLATION_DONE, "config.yaml"):  # how the folder was made, not what it holds
        (model / marker).write_text("anything")
    assert input_stamp(model) == before
    (model / "weights.safetensors").write_bytes(b"\1" * 9)  # a retrained stage rewrites its weights
    os.utime(model / "weights.safetensors", ns=(1, 1))
    assert input_stamp(model) != before
    assert input_stamp(tmp_path / "nowhere") == "missing"


def test_a_marker_holds_its_key_until_cleared(tmp_path):
    command = "python -m distill.train --config configs/toy/distill.yaml loop.seed=1"
    assert not is_marked(tmp_path, command, ABLATION_DONE)
    write_marker(tmp_path, command, ABLATION_DONE)
    assert (tmp_path / ABLATION_DONE).read_text() == command  # the ablation's record is the command itself
    assert is_marked(tmp_path, command, ABLATION_DONE) and not is_marked(tmp_path, command + " x", ABLATION_DONE)
    assert not is_marked(tmp_path, command, DONE)  # each kind of folder has its own marker
    (tmp_path / DONE).write_text("abc def\n")  # a stage marker written before, with its newline
    assert is_marked(tmp_path, "abc def")
    assert clear_marker(tmp_path, ABLATION_DONE) and not clear_marker(tmp_path, ABLATION_DONE)
    assert not is_marked(tmp_path, command, ABLATION_DONE)
