"""`python -m teacher.cache` on a tiny teacher: what it stores matches the teacher, resume, corruption, modes."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny_salmonn import write_teacher_folder

from common.dataset import AudioTextCollator, AudioTextDataset, DataConfig
from common.features import FeatureConfig
from teacher.cache import main as cache_main
from teacher.cache import sample_keys
from teacher.cache_store import CacheError, CacheReader
from teacher.checkpoint import load_model_folder
from teacher.salmonn import shift_for_next_token

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    write_teacher_folder(root)
    rng = np.random.default_rng(0)
    entries = []
    for i, text in enumerate(["the cat sat", "hello world", "the dog runs on the mat", "a high tone"]):
        sf.write(root / f"{i}.wav", (0.3 * rng.standard_normal(8000 + 2000 * i)).astype(np.float32), 16000)
        entries.append({"path": f"{i}.wav", "text": text, "task": "asr" if i < 3 else "audiocaption"})
    entries.append({"path": "3.wav", "text": "three short beeps", "task": "audiocaption"})
    (root / "train.json").write_text(json.dumps({"annotation": entries}))
    return root


def args(root, out, *extra):
    return [f"teacher_folder={root / 'teacher'}", f"data.train=[{root / 'train.json'}]",
            "features.whisper_chunk_seconds=2", "shard_size=2", "batch_size=2", "k=5", f"output_dir={out}", *extra]


def open_reader(root, out, **kw):
    teacher = load_model_folder(root / "teacher")
    manifest = json.loads((out / "manifest.json").read_text())
    return CacheReader(out, expect_teacher=manifest["teacher"], expect_tokenizer=manifest["tokenizer"], **kw), teacher


def test_topk_cache_holds_the_teachers_distribution(setup, tmp_path):
    root = setup
    out = tmp_path / "topk"
    assert cache_main(args(root, out)) == 0
    reader, teacher = open_reader(root, out, expect_mode="topk", expect_k=5)
    ds = AudioTextDataset.scan([str(root / "train.json")], DataConfig(), FeatureConfig(whisper_chunk_seconds=2))
    assert reader.keys() == sample_keys(ds) and len(reader) == 5
    # The cache ran sample 2 in one batch with sample 3 (shard_size=2, batch_size=2). The teacher pads BEATs' input
    # as the released SALMONN does, so a padded clip's outputs depend on its batch: run the same batch.
    batch = AudioTextCollator(teacher.tokenizer)([ds[2], ds[3]])
    with torch.no_grad():
        out_t = teacher(batch)
    logits, labels = shift_for_next_token(out_t.logits, out_t.labels)
    keep = labels[0] != -100
    probs = logits[0][keep].softmax(-1)
    cached = reader[2]
    tok = teacher.tokenizer
    expected_ids = tok("the dog runs on the mat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert cached.target_ids.tolist() == expected_ids
    # Batched rows may differ by float rounding, so near-ties may swap order: compare probabilities, not ranks.
    top = probs.topk(5, dim=-1)
    torch.testing.assert_close(cached.sparse_values.float(), top.values, atol=1e-3, rtol=1e-2)  # stored in fp16
    torch.testing.assert_close(probs.gather(-1, cached.sparse_ids), top.values, atol=1e-3, rtol=1e-2)
    # 0.75 s of audio = 75 mel frames -> 38 encoder frames -> 2 windows of 17 (the other 3 only see padding)
    assert out_t.qformer_out.shape[1] == 5 and cached.qformer.shape == (2, 32)
    torch.testing.assert_close(cached.qformer.float(), out_t.qformer_out[0, :2], atol=2e-3, rtol=1e-2)
    assert reader.stats().bytes_per_token > 0
    assert (out / "DONE").is_file()
    report = json.loads((out / "data_report_train.json").read_text())  # every stage that reads data writes it
    assert report["entries"] == 5 and report["kept"] == 5


def test_second_run_skips_and_corruption_is_detected(setup, tmp_path, capsys):
    root = setup
    out = tmp_path / "c"
    cache_main(args(root, out))
    cache_main(args(root, out))
    assert "up to date" in capsys.readouterr().out
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader, _ = open_reader(root, out)
    with pytest.raises(CacheError, match="sha256"):
        reader[2]
    # An interrupted or damaged cache is resumed: only the bad shard is recomputed.
    (out / "DONE").unlink()
    with pytest.warns(UserWarning):
        cache_main(args(root, out))
    assert "1 of 3 shards to compute" in capsys.readouterr().out
    reader, _ = open_reader(root, out, verify_all=True)
    assert len(reader) == 5


def test_sampled_cache_and_identity_mismatch(setup, tmp_path):
    root = setup
    out = tmp_path / "sampled"
    cache_main(args(root, out, "mode=sampled", "k=8"))
    reader, _ = open_reader(root, out, expect_mode="sampled", expect_k=8)
    sample = reader[0]
    torch.testing.assert_close(sample.sparse_values.float().sum(-1), torch.ones(sample.num_tokens), atol=1e-3,
                               rtol=0)  # proposal = teacher: every weight is 1/k
    with pytest.raises(CacheError, match="mode"):
        open_reader(root, out, expect_mode="topk")


def test_float16_teacher_path_stays_close_to_float32(setup, tmp_path):
    """inference_dtype=float16 (what a V100 runs): the same targets, nearly the same distribution and features."""
    root = setup
    full, half = tmp_path / "fp32", tmp_path / "fp16"
    cache_main(args(root, full, "device=cpu", "inference_dtype=float32"))
    cache_main(args(root, half, "device=cpu", "inference_dtype=float16"))
    a, _ = open_reader(root, full)
    b, _ = open_reader(root, half)
    assert not all(torch.equal(a[i].qformer, b[i].qformer) for i in range(len(a)))  # it did run in float16
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x.target_ids, y.target_ids)
        top_x, top_y = x.sparse_ids[:, 0], y.sparse_ids[:, 0]
        assert (top_x == top_y).float().mean() >= 0.8
        assert torch.allclose(x.qformer.float(), y.qformer.float(), atol=5e-2, rtol=5e-2)


def test_a_gpu_that_is_not_there_is_a_config_error(setup, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="device='cuda' but this machine has no CUDA GPU"):
        cache_main(args(setup, tmp_path / "gpu", "device=cuda"))


def test_a_finished_cache_of_another_config_is_rebuilt_an_unfinished_one_refused(setup, tmp_path, capsys):
    """The stage's own finished output goes stale when its config or teacher changes, and is rebuilt (as
    distill.sh reruns stale stages); a half-written cache of another identity is never mixed in."""
    root = setup
    out = tmp_path / "stale"
    cache_main(args(root, out))
    assert cache_main(args(root, out, "k=4")) == 0
    assert "rebuilding it" in capsys.readouterr().out
    reader, _ = open_reader(root, out, expect_k=4)
    assert reader[0].sparse_ids.shape[-1] == 4

    (out / "DONE").unlink()  # as if the k=4 run had been interrupted
    with pytest.raises(CacheError, match="different k.*--force"):
        cache_main(args(root, out, "k=5"))


def test_a_cache_from_before_the_padding_option_and_tokenizer_encoding_is_stale(setup, tmp_path, capsys):
    """A cache whose manifest lacks the teacher's `beats_padding` and the tokenizer's `encoding` (as every cache
    built before issue 24) is refused by its readers and rebuilt by `teacher.cache`, although the teacher
    folder's files are unchanged."""
    from teacher.cache import teacher_identity, teacher_tokenizer_identity

    root = setup
    out = tmp_path / "c"
    cache_main(args(root, out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher"]["beats_padding"] == "official" and "encoding" in manifest["tokenizer"]
    del manifest["teacher"]["beats_padding"]
    del manifest["tokenizer"]["encoding"]
    (out / "manifest.json").write_text(json.dumps(manifest))

    teacher = load_model_folder(root / "teacher")
    with pytest.raises(CacheError):
        CacheReader(out, expect_teacher=teacher_identity(str(root / "teacher")),
                    expect_tokenizer=teacher_tokenizer_identity(teacher.tokenizer))
    capsys.readouterr()
    cache_main(args(root, out))
    assert "up to date" not in capsys.readouterr().out
    reader, _ = open_reader(root, out)
    assert reader.manifest["teacher"]["beats_padding"] == "official"
