"""Caption metrics: pinned against pycocoevalcap (an independent implementation of the same COCO scorers,
run on its own PTB tokenization), and honest about what cannot run."""

import importlib.util
import shutil
import stat
from pathlib import Path

import aac_metrics.utils.checks as aac_checks
import pytest

from common.caption_metrics import (
    METRICS,
    PYCOCOEVALCAP_JARS,
    JavaRuntime,
    MetricUnavailable,
    caption_scores,
    group_references_by_clip,
    locate_java,
    locate_spice,
    prepare_cache_dir,
    ptb_tokenize,
)

requires_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="no `java` on PATH: the PTB tokenizer and METEOR are Java programs"
)
PYCOCOEVALCAP_DIR = Path(next(iter(importlib.util.find_spec("pycocoevalcap").submodule_search_locations)))

# Five clips, two to four references each; case, punctuation, a possessive and a line break to tokenize.
CANDIDATES = [
    "A dog is barking loudly while cars pass by.",
    "Rain falls\non a metal roof",
    "Someone types quickly on a keyboard.",
    "Birds are chirping in the trees.",
    "A man's voice speaks, then a door closes!",
]
REFERENCES = [
    [
        "A dog barks repeatedly as vehicles drive past.",
        "Cars pass by while a dog barks.",
        "A dog is barking and traffic goes by.",
    ],
    [
        "Heavy rain hits a tin roof.",
        "Rain is falling onto a metal roof.",
        "Raindrops patter on the roof of a shed.",
    ],
    ["A person is typing on a computer keyboard.", "Keys click rapidly as someone types."],
    [
        "Many birds chirp and sing in a forest.",
        "Birds chirp while leaves rustle in the wind.",
        "Several birds are singing outdoors.",
        "Birds tweet in the trees nearby.",
    ],
    [
        "A man talks and then a door slams shut.",
        "A man speaks before a door is closed.",
        "A door closes after a man says something.",
    ],
]
# Second pin: the values observed for the set above (aac-metrics 0.5.5, pycocoevalcap 1.2, OpenJDK 17.0.15).
# They equal pycocoevalcap's to the last printed digit.
OBSERVED = {
    "cider_d": 1.8764412747765313,
    "bleu_4": 0.27250257470391065,
    "rouge_l": 0.5761047761273741,
    "meteor": 0.3188621256402836,
}
OBSERVED_CIDER_D_PER_CLIP = [
    2.4692623672091716,
    1.5827359551422016,
    1.3321907337953038,
    1.7115950898324521,
    2.2864222279035267,
]


def _pycocoevalcap_scores(meteor_scorer) -> dict:
    """The same scores from pycocoevalcap's own PTB tokenizer, Cider (CIDEr-D), Bleu, Rouge and `Meteor`."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    res = tokenizer.tokenize({i: [{"caption": text}] for i, text in enumerate(CANDIDATES)})
    gts = tokenizer.tokenize({i: [{"caption": text} for text in refs] for i, refs in enumerate(REFERENCES)})
    cider_d, cider_d_per_clip = Cider().compute_score(gts, res)
    scores = {
        "tokenized": (res, gts),
        "cider_d": cider_d,
        "cider_d_per_clip": list(cider_d_per_clip),
        "bleu_4": Bleu(4).compute_score(gts, res, verbose=0)[0][3],
        "rouge_l": Rouge().compute_score(gts, res)[0],
        "meteor": meteor_scorer.compute_score(gts, res)[0],
    }
    del meteor_scorer  # its __del__ ends the Java process
    return scores


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(smolt's scores, pycocoevalcap's scores), with no SPICE install anywhere smolt looks."""
    from pycocoevalcap.meteor.meteor import Meteor

    # pycocoevalcap's METEOR Java process starts loading its 60 MB paraphrase table right away: start it
    # first, so that it loads while smolt's own METEOR does.
    meteor_scorer = Meteor()
    with pytest.MonkeyPatch.context() as patch:
        # aac-metrics' own cache is where a SPICE install would be found: point it at an empty folder.
        patch.setenv("AAC_METRICS_CACHE_PATH", str(tmp_path_factory.mktemp("aac_metrics_cache")))
        ours = caption_scores(CANDIDATES, REFERENCES, tmp_path_factory.mktemp("smolt_cache"))
    return ours, _pycocoevalcap_scores(meteor_scorer)


@requires_java
@pytest.mark.slow
def test_cider_d_matches_pycocoevalcap(scored):
    ours, reference = scored
    assert ours["cider_d"] == pytest.approx(reference["cider_d"], abs=1e-6)
    assert ours["cider_d_per_clip"] == pytest.approx(reference["cider_d_per_clip"], abs=1e-6)
    assert ours["cider_d"] == pytest.approx(OBSERVED["cider_d"], abs=1e-6)
    assert ours["cider_d_per_clip"] == pytest.approx(OBSERVED_CIDER_D_PER_CLIP, abs=1e-6)
    assert ours["clips"] == len(CANDIDATES)


@requires_java
@pytest.mark.slow
@pytest.mark.parametrize("metric", ["bleu_4", "rouge_l", "meteor"])
def test_other_metrics_match_pycocoevalcap(scored, metric):
    ours, reference = scored
    assert ours[metric] == pytest.approx(reference[metric], abs=1e-6)
    assert ours[metric] == pytest.approx(OBSERVED[metric], abs=1e-6)
    assert metric not in ours["unavailable"]


@requires_java
@pytest.mark.slow
def test_spice_and_spider_are_none_with_reason_without_jars(scored):
    ours, _ = scored
    assert ours["spice"] is None and ours["spider"] is None
    assert "Stanford CoreNLP 3.6.0" in ours["unavailable"]["spice"]
    assert "aac-metrics-download" in ours["unavailable"]["spice"]
    assert ours["unavailable"]["spider"] == "needs SPICE"
    assert set(ours["unavailable"]) == {"spice", "spider"}
    # aac-metrics' Java bound was lifted for METEOR and the tokenizer only, and is back in place.
    assert aac_checks.MAX_JAVA_MAJOR_VERSION == 13


@requires_java
def test_ptb_tokenization_matches_pycocoevalcap(tmp_path):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    candidates = ["A man's voice speaks, then a door closes!", "Rain falls\non a (metal) roof..."]
    references = [["It's the kids' toy -- isn't it?", "A door: CLOSED."], ["Rain; rain!"]]
    ours = ptb_tokenize(candidates, references, locate_java(), prepare_cache_dir(tmp_path))
    tokenizer = PTBTokenizer()
    res = tokenizer.tokenize({i: [{"caption": text}] for i, text in enumerate(candidates)})
    gts = tokenizer.tokenize({i: [{"caption": text} for text in refs] for i, refs in enumerate(references)})
    assert ours == ([res[i][0] for i in range(2)], [gts[i] for i in range(2)])
    assert ours[0][0] == "a man 's voice speaks then a door closes"


def test_without_java_every_metric_is_none_with_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("AAC_METRICS_JAVA_PATH", str(tmp_path / "no-such-java"))
    scores = caption_scores(CANDIDATES, REFERENCES, tmp_path / "cache")
    assert all(scores[name] is None for name in METRICS)
    assert scores["cider_d_per_clip"] is None
    assert set(scores["unavailable"]) == set(METRICS)
    assert "PTB tokenizer needs Java" in scores["unavailable"]["cider_d"]
    assert "no-such-java" in scores["unavailable"]["meteor"]


@pytest.mark.parametrize(
    ("banner", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', 17),
        ('java version "1.8.0_402"', 8),
        ('openjdk version "21-ea"', 21),
    ],
)
def test_locate_java_reads_major_version(monkeypatch, tmp_path, banner, major):
    fake_java = _fake_java(tmp_path, banner)
    monkeypatch.setenv("AAC_METRICS_JAVA_PATH", str(fake_java))
    assert locate_java() == JavaRuntime(str(fake_java), major)


def test_locate_java_rejects_java_7(monkeypatch, tmp_path):
    monkeypatch.setenv("AAC_METRICS_JAVA_PATH", str(_fake_java(tmp_path, 'java version "1.7.0_80"')))
    with pytest.raises(MetricUnavailable, match="Java 7"):
        locate_java()


def test_locate_spice_finds_a_complete_install(tmp_path):
    empty, install = tmp_path / "empty", _fake_spice_install(tmp_path / "install")
    assert locate_spice(JavaRuntime("java", 11), [empty, install]) == install
    # SPICE 1.0 breaks on newer Java: refused with the reason, jars or not.
    with pytest.raises(MetricUnavailable, match="Java 17") as refused:
        locate_spice(JavaRuntime("java", 17), [install])
    assert "CoreNLP" not in str(refused.value)


def test_locate_spice_names_the_missing_corenlp_jar(tmp_path):
    install = _fake_spice_install(tmp_path)
    (install / "aac-metrics" / "spice" / "lib" / "stanford-corenlp-3.6.0-models.jar").unlink()
    with pytest.raises(MetricUnavailable, match="stanford-corenlp-3.6.0-models.jar"):
        locate_spice(JavaRuntime("java", 11), [install])


def test_prepare_cache_dir_links_pycocoevalcap_jars_and_keeps_existing_files(tmp_path):
    kept = tmp_path / next(iter(PYCOCOEVALCAP_JARS))
    kept.parent.mkdir(parents=True)
    kept.write_text("a jar the user put here")
    assert prepare_cache_dir(tmp_path) == tmp_path
    prepare_cache_dir(tmp_path)  # a second run changes nothing
    assert kept.read_text() == "a jar the user put here"
    for cache_name, package_name in list(PYCOCOEVALCAP_JARS.items())[1:]:
        assert (tmp_path / cache_name).resolve() == (PYCOCOEVALCAP_DIR / package_name).resolve()


def test_group_references_by_clip():
    entries = [
        {"path": "b.wav", "text": "rain on a roof", "task": "audiocaption"},
        {"path": "a.wav", "text": "a dog barks", "task": "audiocaption"},
        {"path": "b.wav", "text": "heavy rain", "task": "audiocaption"},
    ]
    grouped = group_references_by_clip(entries)
    assert grouped == {"b.wav": ["rain on a roof", "heavy rain"], "a.wav": ["a dog barks"]}
    assert list(grouped) == ["b.wav", "a.wav"]  # first-seen order


@pytest.mark.parametrize(
    ("candidates", "references", "error", "match"),
    [
        (["a", "b"], [["a"]], ValueError, "2 candidates for 1 clips"),
        (["a"], [["a"]], ValueError, "at least 2 clips"),
        (["a", "b"], [["a"], []], ValueError, "clip 1"),
        (["a", "b"], [["a"], ["  "]], ValueError, "clip 1"),
        ("ab", [["a"], ["b"]], TypeError, "candidates"),
        (["a", "b"], ["a", "b"], TypeError, "references"),
    ],
)
def test_bad_inputs_are_errors(candidates, references, error, match):
    with pytest.raises(error, match=match):
        caption_scores(candidates, references)


def _fake_java(folder: Path, banner: str) -> Path:
    """An executable that answers `-version` like a JDK does (on stderr)."""
    script = folder / "java"
    script.write_text(f"#!/bin/sh\necho '{banner}' >&2\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def _fake_spice_install(cache_dir: Path) -> Path:
    """Empty files laid out as `aac-metrics-download` installs SPICE: pycocoevalcap's SPICE lib jars plus
    the two Stanford CoreNLP 3.6.0 jars that only the SPICE download brings."""
    spice_dir = cache_dir / "aac-metrics" / "spice"
    (spice_dir / "cache").mkdir(parents=True)
    (spice_dir / "lib").mkdir()
    (spice_dir / "spice-1.0.jar").touch()
    jars = [path.name for path in (PYCOCOEVALCAP_DIR / "spice" / "lib").glob("*.jar")]
    for name in [*jars, "stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"]:
        (spice_dir / "lib" / name).touch()
    return cache_dir


def test_the_spice_note_names_no_home_folder_or_java_binary(tmp_path, monkeypatch):
    """The note lands in results.json and the committed tables: `~` for the home folder, the setting for Java."""
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    with pytest.raises(MetricUnavailable) as refused:
        locate_spice(JavaRuntime("/opt/jdk-17/bin/java", 17), [tmp_path / ".cache" / "smolt"])
    note = str(refused.value)
    assert "~/.cache/smolt" in note and str(tmp_path) not in note
    assert "/opt/jdk-17" not in note and "AAC_METRICS_JAVA_PATH" in note
