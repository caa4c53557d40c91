"""teacher.cache_report: per-task numbers of a cache whose distributions are known by construction."""

import json
import math

import pytest
import torch

from common.config import config_hash
from teacher.cache_report import cache_report, main
from teacher.cache_store import CachedSample, CacheIdentity, tokenizer_identity
from teacher.cache_writer import CacheWriter

VOCAB = 10


def write(root, samples, mode="topk"):
    ident = CacheIdentity(teacher={"name": "toy", "sha256": "00"},
                          tokenizer=tokenizer_identity("toy", {f"t{i}": i for i in range(VOCAB)}),
                          config_hash=config_hash({"split": "train"}), mode=mode, k=2, dtype="float32")
    writer = CacheWriter(root, ident, list(samples), 2)
    for shard in writer.pending_shards():
        writer.write_shard(shard.index, [samples[key] for key in shard.keys])


def sample(targets, ids, probs):
    return CachedSample(target_ids=torch.tensor(targets), sparse_ids=torch.tensor(ids),
                        sparse_values=torch.tensor(probs, dtype=torch.float32), qformer=torch.zeros(1, 4))


def test_per_task_numbers_match_the_distributions_written(tmp_path):
    # asr: two positions, each one-hot on the label (kept mass 1). audiocaption: one 50/50 position whose label is the
    # second entry, one position whose label is outside the top-2 (mass 0.8 kept, 0.6/0.2 → renormalised 0.75/0.25).
    samples = {
        "0000000|asr|a.flac|x": sample([3], [[3, 4]], [[1.0, 0.0]]),
        "0000001|audiocaption|b.flac|y": sample([5, 7], [[6, 5], [1, 2]], [[0.5, 0.5], [0.6, 0.2]]),
        "0000002|asr|c.flac|z": sample([2], [[2, 0]], [[1.0, 0.0]]),
    }
    write(tmp_path, samples)
    reports = {r.task: r for r in cache_report(tmp_path)}
    assert list(reports) == ["asr", "audiocaption"]
    asr, cap = reports["asr"], reports["audiocaption"]
    assert (asr.samples, asr.tokens, asr.top1_is_label, asr.label_prob, asr.soft_share) == (2, 2, 1.0, 1.0, 0.0)
    assert asr.entropy_nats == pytest.approx(0.0, abs=1e-6)  # log(1e-12) clamps the zero entry: 0 · (−27.6) = 0
    h_75_25 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert (cap.samples, cap.tokens, cap.top1_is_label) == (1, 2, 0.0)
    # float32 storage of 0.6 / 0.2 and a float32 sum: 1e-6 relative
    assert cap.label_prob == pytest.approx(0.25, rel=1e-6)
    assert cap.entropy_nats == pytest.approx((math.log(2) + h_75_25) / 2, rel=1e-6)
    assert cap.soft_share == 1.0  # log 2 = 0.69 and 0.56 nats, both ≥ 0.5
    assert cap.kept_mass == pytest.approx(0.9, rel=1e-6)


def test_command_prints_the_table_and_writes_json(tmp_path, capsys):
    write(tmp_path / "cache", {"0000000|asr|a.flac|x": sample([3], [[3, 4]], [[0.9, 0.1]])})
    assert main([str(tmp_path / "cache"), "--json", str(tmp_path / "r.json")]) == 0
    assert "| asr | 1 | 1 | 1.000 | 0.900 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())[0]["label_prob"] == pytest.approx(0.9, rel=1e-6)


def test_a_sampled_cache_or_no_cache_is_refused_with_the_file_named(tmp_path, capsys):
    write(tmp_path / "sampled", {"0000000|asr|a.flac|x": sample([3], [[3, 4]], [[2.0, 0.5]])}, mode="sampled")
    assert main([str(tmp_path / "sampled")]) == 2
    assert "manifest.json: mode 'sampled'" in capsys.readouterr().err
    assert main([str(tmp_path / "none")]) == 2
    assert "manifest missing" in capsys.readouterr().err
