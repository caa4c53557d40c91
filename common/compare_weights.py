"""Are two saved model folders the same weights, bit for bit?

    python -m common.compare_weights outputs/toy/student/model outputs/toy/student-anneal/model

Reads every tensor of every weight file under each folder (`.safetensors`, and the `.pt` / `.pth` / `.bin`
state dicts that the official BEATs and SALMONN layouts use; a BEATs `.pt` keeps its weights under `model`),
keyed by file and tensor name, and compares them with `torch.equal`. Prints the count of tensors, values and
differing tensors; exits 0 when the folders hold identical weights, 1 otherwise. Used to check that training is
deterministic (the same config and seed give the same student) before reusing a run.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below: quiet their known third-party noise
    from common.cli import quiet_third_party_logs

    quiet_third_party_logs()

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from common.cli import run

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")


def weight_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the weight files under `folder`, keyed `<file relative to folder>:<tensor name>`."""
    root = Path(folder)
    if not root.is_dir():
        raise SystemExit(f"compare_weights: {root} is not a folder; give two saved model folders")
    out: dict[str, torch.Tensor] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix == ".safetensors":
            tensors = load_file(str(path))
        elif path.suffix in STATE_DICT_SUFFIXES:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
                obj = obj["model"]
            tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)} if isinstance(obj, dict) else {}
        else:
            continue
        out.update({f"{path.relative_to(root)}:{name}": t for name, t in tensors.items()})
    return out


def compare(a: str | Path, b: str | Path) -> dict:
    """{"tensors", "values", "differing" (names whose tensors differ), "only_in_a", "only_in_b"}."""
    ta, tb = weight_tensors(a), weight_tensors(b)
    shared = sorted(set(ta) & set(tb))
    differing = [k for k in shared if ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k])]
    return {"tensors": len(shared), "values": sum(ta[k].numel() for k in shared), "differing": differing,
            "only_in_a": sorted(set(ta) - set(tb)), "only_in_b": sorted(set(tb) - set(ta))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.compare_weights", description=__doc__.split("\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args(argv)
    result = compare(args.a, args.b)
    print(f"{result['tensors']} tensors, {result['values']:,} values in both; differing tensors: "
          f"{len(result['differing'])}; only in {args.a}: {len(result['only_in_a'])}; only in {args.b}: "
          f"{len(result['only_in_b'])}")
    for name in (result["differing"] + result["only_in_a"] + result["only_in_b"])[:10]:
        print(f"  {name}")
    same = result["tensors"] > 0 and not (result["differing"] or result["only_in_a"] or result["only_in_b"])
    return 0 if same else 1


if __name__ == "__main__":
    run(main)
