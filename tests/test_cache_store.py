"""Teacher cache store: round trip, resume after a crash, corruption and identity checks, bytes per token."""

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import teacher.cache_store as cache_store
from common.config import config_hash
from teacher.cache_store import (
    CachedSample,
    CacheError,
    CacheIdentity,
    CacheReader,
    shard_name,
    sidecar_name,
    tokenizer_identity,
)
from teacher.cache_writer import CacheWriter

VOCAB = 50
DIM = 6
TEACHER = {"name": "toy-salmonn", "sha256": "ab12"}
TOKENIZER = tokenizer_identity("toy-bpe", {f"tok{i}": i for i in range(VOCAB)})


def identity(mode="topk", k=4, dtype="float16", teacher=TEACHER, config=None):
    return CacheIdentity(teacher=teacher, tokenizer=TOKENIZER, config_hash=config_hash(config or {"split": "dev"}),
                         mode=mode, k=k, dtype=dtype)


def make_samples(n, k=4, mode="topk", dtype=torch.float16, seed=0):
    """n samples of 1..9 tokens and 2..4 windows; values already in the storage dtype so a round trip is exact."""
    gen = torch.Generator().manual_seed(seed)
    samples = {}
    for i in range(n):
        tokens = 1 + (i * 5) % 9
        logits = torch.randn(tokens, VOCAB, generator=gen)
        if mode == "topk":
            values, ids = logits.softmax(-1).topk(k, dim=-1)
        else:
            ids = torch.randint(0, VOCAB, (tokens, k), generator=gen)
            values = torch.rand(tokens, k, generator=gen)
        samples[f"clip{i}.wav|asr|{i:04x}"] = CachedSample(
            target_ids=torch.randint(0, VOCAB, (tokens,), generator=gen), sparse_ids=ids,
            sparse_values=values.to(dtype), qformer=torch.randn(2 + i % 3, DIM, generator=gen).to(dtype))
    return samples


def write_cache(root, ident, samples, shard_size=4, only=None):
    """Write every pending shard (or those in `only`); returns the writer."""
    writer = CacheWriter(root, ident, list(samples), shard_size)
    for shard in writer.pending_shards():
        if only is None or shard.index in only:
            writer.write_shard(shard.index, [samples[key] for key in shard.keys])
    return writer


def open_reader(root, **kwargs):
    return CacheReader(root, expect_teacher=TEACHER, expect_tokenizer=TOKENIZER, **kwargs)


def folder_bytes(root):
    return {path.name: path.read_bytes() for path in sorted(root.iterdir())}


def assert_same_sample(found, want):
    assert found.target_ids.dtype == found.sparse_ids.dtype == torch.int64
    assert torch.equal(found.target_ids, want.target_ids)
    assert torch.equal(found.sparse_ids, want.sparse_ids)
    assert found.sparse_values.dtype == want.sparse_values.dtype
    assert torch.equal(found.sparse_values, want.sparse_values)
    assert torch.equal(found.qformer, want.qformer)


@pytest.mark.parametrize(("mode", "dtype"), [("topk", "float16"), ("sampled", "float32")])
def test_round_trip_by_key_and_index(tmp_path, mode, dtype):
    samples = make_samples(11, mode=mode, dtype=getattr(torch, dtype))
    writer = write_cache(tmp_path, identity(mode=mode, dtype=dtype), samples, shard_size=4)
    assert writer.complete and writer.pending_shards() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["manifest.json"] + [f(i) for i in range(3) for f in (shard_name, sidecar_name)])

    reader = open_reader(tmp_path, expect_mode=mode, expect_k=4, max_open_shards=2)
    assert len(reader) == 11 and reader.keys() == list(samples)
    for index, (key, want) in enumerate(samples.items()):
        assert key in reader and reader.index_of(key) == index
        assert_same_sample(reader[key], want)
        assert_same_sample(reader[index], want)
    assert_same_sample(reader[-1], list(samples.values())[-1])
    with pytest.raises(KeyError, match="not in the cache"):
        reader["nope.wav"]
    with pytest.raises(IndexError):
        reader[11]

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_shards"] == 3 and manifest["sample_keys"] == list(samples)
    assert [entry["samples"] for entry in manifest["shards"]] == [4, 4, 3]
    assert manifest["qformer_dim"] == DIM and manifest["mode"] == mode and manifest["dtype"] == dtype


def test_shard_tensors_follow_the_documented_layout(tmp_path):
    samples = make_samples(3)
    write_cache(tmp_path, identity(), samples, shard_size=4)
    tensors = load_file(tmp_path / shard_name(0))
    lengths = [s.num_tokens for s in samples.values()]
    assert tensors["token_offsets"].tolist() == [0, lengths[0], sum(lengths[:2]), sum(lengths)]
    assert tensors["window_offsets"].tolist() == [0, 2, 5, 9]
    assert tensors["target_ids"].dtype == tensors["sparse_ids"].dtype == torch.int32
    assert tensors["sparse_values"].shape == (sum(lengths), 4) and tensors["qformer"].shape == (9, DIM)


def test_resume_after_crash_equals_uninterrupted_run(tmp_path):
    samples = make_samples(11)
    write_cache(tmp_path / "whole", identity(), samples)

    crashed = tmp_path / "crashed"
    write_cache(crashed, identity(), samples, only={0, 1})
    # The crash: shard 2 was being written (a .tmp, no sidecar), the manifest still says incomplete.
    (crashed / (shard_name(2) + ".tmp")).write_bytes(b"half a shard")
    with pytest.raises(CacheError, match="unfinished"):
        open_reader(crashed)

    resumed = CacheWriter(crashed, identity(), list(samples), 4)
    pending = resumed.pending_shards()
    assert [(p.index, p.keys, p.sample_indices) for p in pending] == [(2, tuple(list(samples)[8:]), range(8, 11))]
    assert not list(crashed.glob("*.tmp"))
    resumed.write_shard(2, [samples[key] for key in pending[0].keys])
    assert resumed.complete
    assert folder_bytes(crashed) == folder_bytes(tmp_path / "whole")
    assert CacheWriter(crashed, identity(), list(samples), 4).pending_shards() == []
    assert folder_bytes(crashed) == folder_bytes(tmp_path / "whole")


def test_resume_recomputes_a_finished_shard_that_was_damaged(tmp_path):
    samples = make_samples(11)
    write_cache(tmp_path, identity(), samples)
    path = tmp_path / shard_name(1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="sha256"):
        writer = CacheWriter(tmp_path, identity(), list(samples), 4)
    assert [p.index for p in writer.pending_shards()] == [1] and "recomputed" in writer.discarded[0]
    assert not json.loads((tmp_path / "manifest.json").read_text())["complete"]
    writer.write_shard(1, [samples[key] for key in writer.shard_keys(1)])
    assert_same_sample(open_reader(tmp_path, verify_all=True)[5], samples[list(samples)[5]])


@pytest.mark.parametrize(("change", "field"), [({"config": {"split": "test"}}, "config_hash"),
                                               ({"teacher": {"name": "other", "sha256": "ff"}}, "teacher"),
                                               ({"k": 8}, "k")])
def test_writer_refuses_another_cache_unless_forced(tmp_path, change, field):
    samples = make_samples(6)
    write_cache(tmp_path, identity(), samples)
    (tmp_path / "notes.txt").write_text("not ours")
    with pytest.raises(CacheError, match=f"different {field}.*force"):
        CacheWriter(tmp_path, identity(**change), list(samples), 4)
    with pytest.raises(CacheError, match="different sample_keys"):
        CacheWriter(tmp_path, identity(), list(samples)[::-1], 4)

    writer = CacheWriter(tmp_path, identity(**change), list(samples), 4, force=True)
    assert [p.index for p in writer.pending_shards()] == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "notes.txt"]


def test_flipped_byte_fails_sha256_lazily_or_up_front(tmp_path):
    samples = make_samples(11)
    write_cache(tmp_path, identity(), samples)
    path = tmp_path / shard_name(2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    reader = open_reader(tmp_path)  # lazy: shards 0 and 1 still read
    assert_same_sample(reader[0], samples[list(samples)[0]])
    with pytest.raises(CacheError, match=rf"{shard_name(2)}: sha256 mismatch.*--force"):
        reader[9]
    with pytest.raises(CacheError, match=rf"{shard_name(2)}: sha256 mismatch"):
        open_reader(tmp_path, verify_all=True)


def test_truncated_or_missing_shard_fails_on_open(tmp_path):
    write_cache(tmp_path, identity(), make_samples(11))
    path = tmp_path / shard_name(1)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CacheError, match=rf"{shard_name(1)}: shard file has \d+ bytes.*truncated"):
        open_reader(tmp_path)
    path.unlink()
    with pytest.raises(CacheError, match=rf"{shard_name(1)}: shard file missing"):
        open_reader(tmp_path)


def test_manifest_missing_a_shard_or_missing_entirely(tmp_path):
    write_cache(tmp_path, identity(), make_samples(11))
    manifest_path = tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][1] = None
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"manifest.json: the cache is unfinished \(shards \[1\] unfinished of 3\)"):
        open_reader(tmp_path)
    manifest_path.unlink()
    with pytest.raises(CacheError, match="manifest missing"):
        open_reader(tmp_path)


def test_consistent_sha_but_bad_offsets_is_caught(tmp_path):
    write_cache(tmp_path, identity(), make_samples(4))
    path = tmp_path / shard_name(0)
    tensors = load_file(path)
    tensors["token_offsets"][[1, 2]] = tensors["token_offsets"][[2, 1]]
    keys = json.loads((tmp_path / "manifest.json").read_text())["sample_keys"]
    save_file(tensors, path, metadata={"sample_keys": json.dumps(keys)})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = cache_store._sha256_file(path)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="token_offsets must rise monotonically"):
        open_reader(tmp_path)[0]


@pytest.mark.parametrize(("expect", "field"), [({"expect_teacher": {"name": "toy-salmonn", "sha256": "cd34"}},
                                                 "teacher.*sha256: cache has 'ab12', expected 'cd34'"),
                                                ({"expect_tokenizer": tokenizer_identity("toy-bpe", {"a": 0})},
                                                 "tokenizer"),
                                                ({"expect_mode": "sampled"}, "mode"),
                                                ({"expect_k": 8}, "k")])
def test_reader_rejects_another_teacher_tokenizer_mode_or_k(tmp_path, expect, field):
    write_cache(tmp_path, identity(), make_samples(3))
    kwargs = {"expect_teacher": TEACHER, "expect_tokenizer": TOKENIZER, **expect}
    with pytest.raises(CacheError, match=f"manifest.json: the cache was made with a different {field}.*--force"):
        CacheReader(tmp_path, **kwargs)


def test_bytes_per_token_on_a_known_case(tmp_path):
    """k=4, fp16: sparse bytes per token = 4 * (4 id bytes + 2 value bytes) = 24; total from the file layout."""
    samples = make_samples(5)  # tokens 1, 6, 2, 7, 3 and windows 2, 3, 4, 2, 3 -> shards of 4 and 1 samples
    write_cache(tmp_path, identity(k=4, dtype="float16"), samples, shard_size=4)
    stats = open_reader(tmp_path).stats()
    assert (stats.samples, stats.tokens, stats.windows) == (5, 19, 14)
    assert stats.sparse_bytes == 19 * 24 and stats.sparse_bytes_per_token == 24.0

    def payload(tokens, windows, n):  # target int32, ids int32, values fp16, qformer fp16, two int64 offsets
        return tokens * 4 + tokens * 4 * 4 + tokens * 4 * 2 + windows * DIM * 2 + 2 * (n + 1) * 8

    headers = sum(8 + struct.unpack("<Q", (tmp_path / shard_name(i)).read_bytes()[:8])[0] for i in range(2))
    total = headers + payload(16, 11, 4) + payload(3, 3, 1)
    assert stats.total_bytes == total and stats.bytes_per_token == pytest.approx(total / 19)
    assert "24.0 B/token sparse" in stats.summary()


def test_writer_rejects_bad_samples(tmp_path):
    samples = make_samples(4)
    writer = CacheWriter(tmp_path, identity(), list(samples), 2)
    first, second, *_ = samples.values()
    with pytest.raises(ValueError, match=r"sparse_ids has shape \[1, 3\], expected \[1, 4\]"):
        writer.write_shard(0, [CachedSample(first.target_ids, first.sparse_ids[:, :3], first.sparse_values,
                                            first.qformer), second])
    with pytest.raises(ValueError, match="non-finite"):
        writer.write_shard(0, [CachedSample(first.target_ids, first.sparse_ids, first.sparse_values.float() * 1e6,
                                            first.qformer), second])
    writer.write_shard(0, [first, second])
    with pytest.raises(ValueError, match="already finished"):
        writer.write_shard(0, [first, second])
    third, fourth = list(samples.values())[2:]
    with pytest.raises(ValueError, match=rf"qformer has shape \[4, 5\], expected \[4, {DIM}\]"):
        writer.write_shard(1, [CachedSample(third.target_ids, third.sparse_ids, third.sparse_values,
                                            third.qformer[:, :5]), fourth])
    with pytest.raises(ValueError, match="unique"):
        CacheWriter(tmp_path / "dup", identity(), ["a", "a"], 2)


def test_each_shard_is_hashed_once_and_the_reader_pickles(tmp_path, monkeypatch):
    samples = make_samples(11)
    write_cache(tmp_path, identity(), samples)
    hashed = []
    real_sha256 = cache_store._sha256_file
    monkeypatch.setattr(cache_store, "_sha256_file", lambda path: hashed.append(path.name) or real_sha256(path))
    reader = open_reader(tmp_path, max_open_shards=1)
    for index in [0, 5, 10, 1, 9, 6]:  # every access reopens a shard evicted from the 1-slot LRU
        assert_same_sample(reader[index], list(samples.values())[index])
    assert sorted(hashed) == [shard_name(i) for i in range(3)]

    clone = pickle.loads(pickle.dumps(reader))
    assert_same_sample(clone[7], list(samples.values())[7])


def test_identity_helpers_are_order_independent():
    vocab = {"a": 0, "b": 1, "c": 2}
    assert tokenizer_identity("t", vocab) == tokenizer_identity("t", dict(reversed(vocab.items())))
    assert tokenizer_identity("t", vocab) != tokenizer_identity("t", {**vocab, "c": 3})
    assert config_hash({"x": 1, "y": [1, 2]}) == config_hash({"y": [1, 2], "x": 1}) != config_hash({"x": 2})
    with pytest.raises(ValueError, match="mode"):
        identity(mode="dense")
