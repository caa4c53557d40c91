"""AAC quality: CIDEr-D, SPICE, SPIDEr, METEOR, BLEU-4 and ROUGE-L over all references of each clip.

The protocol is the DCASE one (aac-metrics' `evaluate`, pycocoevalcap's `COCOEvalCap`): candidates and
references are tokenized together by the Stanford PTB tokenizer (lower-cased, punctuation dropped), then
every metric scores the tokenized text. The PTB tokenizer, METEOR and SPICE are Java programs; CIDEr-D,
BLEU and ROUGE-L are Python but score PTB tokens, so without Java none of them is reported.

Jars. aac-metrics looks for its jars under `<cache>/aac-metrics/...` and would download them, which these
machines cannot do. The PTB tokenizer (CoreNLP 3.4.1) and METEOR 1.5 with its English paraphrase table ship
inside the pycocoevalcap wheel, so `prepare_cache_dir` links them into a smolt-owned cache dir in the layout
aac-metrics expects. SPICE also needs Stanford CoreNLP 3.6.0 and its models, which no package registry
ships: SPICE runs only where a complete aac-metrics SPICE install is found, in that cache dir or in
aac-metrics' own cache (where `aac-metrics-download` puts it).

Java. The one aac-metrics would use: `AAC_METRICS_JAVA_PATH`, else `java` on PATH. aac-metrics accepts Java
8-13 only. SPICE 1.0 does fail on newer Java (aac-metrics' author reports it on 17 and 20), so SPICE keeps
that range; the PTB tokenizer and METEOR run on newer Java with the same results as pycocoevalcap (pinned in
tests/test_caption_metrics.py), so for them the accepted range is widened to the Java found.

A metric that cannot run is None, its reason under `unavailable[metric]`: never a stand-in number.
"""

import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aac_metrics.utils.checks as aac_checks
from aac_metrics.functional.bleu import bleu_4
from aac_metrics.functional.cider_d import cider_d
from aac_metrics.functional.meteor import DNAME_METEOR_CACHE, FNAME_METEOR_JAR, meteor
from aac_metrics.functional.rouge_l import rouge_l
from aac_metrics.functional.spice import check_spice_install, spice
from aac_metrics.utils.globals import get_default_cache_path, get_default_java_path
from aac_metrics.utils.tokenization import FNAME_STANFORD_CORENLP_3_4_1_JAR, ptb_tokenize_batch

METRICS = ("cider_d", "spice", "spider", "meteor", "bleu_4", "rouge_l")
# aac-metrics' own upper bound, kept for SPICE (read once, before any widening).
SPICE_MAX_JAVA_MAJOR_VERSION = aac_checks.MAX_JAVA_MAJOR_VERSION
MIN_JAVA_MAJOR_VERSION = 8

# Files that aac-metrics expects under a cache dir -> where they are inside the pycocoevalcap package.
PYCOCOEVALCAP_JARS = {
    FNAME_STANFORD_CORENLP_3_4_1_JAR: "tokenizer/stanford-corenlp-3.4.1.jar",
    FNAME_METEOR_JAR: "meteor/meteor-1.5.jar",
    os.path.join(DNAME_METEOR_CACHE, "data", "paraphrase-en.gz"): "meteor/data/paraphrase-en.gz",
}


class MetricUnavailable(RuntimeError):
    """A metric cannot run on this machine; the message says why and what would make it run."""


@dataclass(frozen=True)
class JavaRuntime:
    """A Java executable that answered `java -version`."""

    executable: str
    major_version: int


def default_cache_dir() -> Path:
    """Where smolt lays out the jars for aac-metrics unless told otherwise."""
    return Path.home() / ".cache" / "smolt" / "caption_metrics"


def shown(text: object) -> str:
    """`text` (a path or a message naming paths) as a note may print it: the home folder written `~`, so that a note
    stored in results.json and the tables does not carry this machine's home folder."""
    return str(text).replace(str(Path.home()), "~")


def caption_scores(
    candidates: Sequence[str], references: Sequence[Sequence[str]], cache_dir: Path | None = None
) -> dict:
    """Score one candidate caption per clip against all reference captions of that clip.

    Args:
        candidates: one generated caption per clip.
        references: for each clip, its reference captions (see `group_references_by_clip`).
        cache_dir: aac-metrics cache layout to use and fill; `default_cache_dir()` if None. SPICE also
            looks for its jars there (under `aac-metrics/spice/`) before aac-metrics' own cache.

    Returns a dict with, each a float or None when it cannot run here:
        cider_d: corpus CIDEr-D (sigma 6, clipped, x10; the mean of the per-clip scores).
        spice: corpus SPICE F-score. spider: (cider_d + spice) / 2.
        meteor: corpus METEOR 1.5. bleu_4: corpus BLEU-4 (closest reference length). rouge_l: ROUGE-L.
    and also cider_d_per_clip (list of floats, or None), clips (how many) and unavailable (metric -> reason).
    """
    _check_inputs(candidates, references)
    cache_dir = prepare_cache_dir(cache_dir or default_cache_dir())
    scores: dict = dict.fromkeys(METRICS) | {"cider_d_per_clip": None, "clips": len(candidates)}
    unavailable: dict[str, str] = {}
    scores["unavailable"] = unavailable
    try:
        java = locate_java()
    except MetricUnavailable as err:
        for name in ("cider_d", "bleu_4", "rouge_l"):
            unavailable[name] = f"scores PTB-tokenized text and the PTB tokenizer needs Java: {err}"
        unavailable["meteor"] = unavailable["spice"] = f"needs Java: {err}"
        unavailable["spider"] = "needs SPICE"
        return scores

    tok_candidates, tok_references = ptb_tokenize(candidates, references, java, cache_dir)
    scores |= _python_scores(tok_candidates, tok_references)
    with _accepting_java(java):
        scores["meteor"] = meteor(
            tok_candidates, tok_references, False, cache_path=str(cache_dir), java_path=java.executable
        ).item()
    try:
        scores["spice"] = _spice(tok_candidates, tok_references, java, cache_dir)
        scores["spider"] = (scores["cider_d"] + scores["spice"]) / 2
    except MetricUnavailable as err:
        unavailable["spice"] = str(err)
        unavailable["spider"] = "needs SPICE"
    return scores


def group_references_by_clip(entries: Iterable[Mapping[str, str]]) -> dict[str, list[str]]:
    """Collect the captions of annotation entries by clip: {path: [caption, ...]} in first-seen order.

    SALMONN annotation JSON lists an AAC clip once per reference caption
    (`{"path": ..., "text": ..., "task": "audiocaption"}`); metrics want each clip once with all of them.
    Pass only the entries to score (e.g. those with task "audiocaption"); paths are kept as written.
    """
    grouped: dict[str, list[str]] = {}
    for entry in entries:
        grouped.setdefault(entry["path"], []).append(entry["text"])
    return grouped


def prepare_cache_dir(cache_dir: Path) -> Path:
    """Link pycocoevalcap's PTB tokenizer and METEOR files into `cache_dir` where aac-metrics looks.

    Links, not copies: the METEOR paraphrase table alone is 60 MB. (Java resolves a linked jar to its real
    folder, so METEOR reads `data/` beside pycocoevalcap's jar; the table is linked too so that the layout
    is the one `aac-metrics-download` makes.) Files already present, e.g. downloaded ones, are left alone.
    """
    package_dir = Path(next(iter(importlib.util.find_spec("pycocoevalcap").submodule_search_locations)))
    for cache_name, package_name in PYCOCOEVALCAP_JARS.items():
        _link_if_absent(package_dir / package_name, cache_dir / cache_name)
    return cache_dir


def locate_java() -> JavaRuntime:
    """The Java aac-metrics would run (AAC_METRICS_JAVA_PATH, else `java` on PATH) and its major version."""
    configured = get_default_java_path()
    executable = shutil.which(configured)
    if executable is None:
        raise MetricUnavailable(
            f"no Java executable {configured!r}; install a JRE (e.g. openjdk-17-jre-headless) "
            "or set AAC_METRICS_JAVA_PATH"
        )
    answer = subprocess.run([executable, "-version"], capture_output=True, text=True, timeout=60)
    # Java prints e.g. `openjdk version "17.0.15" 2025-04-15` (or `java version "1.8.0_402"`) on stderr.
    match = re.search(r'version "(\d+)(?:\.(\d+))?', answer.stderr + answer.stdout)
    if match is None:
        raise MetricUnavailable(f"cannot read the version of {executable}: {answer.stderr.strip()!r}")
    major = int(match[1]) if match[1] != "1" else int(match[2])
    if major < MIN_JAVA_MAJOR_VERSION:
        raise MetricUnavailable(f"{executable} is Java {major}; Java {MIN_JAVA_MAJOR_VERSION}+ is needed")
    return JavaRuntime(executable, major)


def locate_spice(java: JavaRuntime, cache_dirs: Sequence[Path]) -> Path:
    """The first of `cache_dirs` holding a complete aac-metrics SPICE install, if `java` can run SPICE.

    Raises MetricUnavailable naming every blocker: missing jars (spice-1.0.jar, lib/ with the Stanford
    CoreNLP 3.6.0 jars, cache/, as `aac-metrics-download` lays them out) and a Java SPICE fails on.
    """
    problems, missing = [], []
    install = None
    for cache_dir in cache_dirs:
        try:
            check_spice_install(str(cache_dir))
            install = cache_dir
            break
        except (FileNotFoundError, NotADirectoryError) as err:
            missing.append(shown(f"in {cache_dir}: {err}"))
    if install is None:
        problems.append(
            "SPICE needs spice-1.0.jar and the Stanford CoreNLP 3.6.0 jars, which no package registry ships "
            f"({'; '.join(missing)}). Run `aac-metrics-download` on a connected machine and copy its "
            f"<cache>/aac-metrics/spice folder to {shown(cache_dirs[0] / 'aac-metrics' / 'spice')}."
        )
    if java.major_version > SPICE_MAX_JAVA_MAJOR_VERSION:
        problems.append(
            f"SPICE 1.0 fails on Java > {SPICE_MAX_JAVA_MAJOR_VERSION} and the Java in use (AAC_METRICS_JAVA_PATH, "
            f"else `java` on PATH) is Java {java.major_version}: set AAC_METRICS_JAVA_PATH to a Java 8 or 11 "
            "executable."
        )
    if problems:
        raise MetricUnavailable(" ".join(problems))
    return install


def ptb_tokenize(
    candidates: Sequence[str], references: Sequence[Sequence[str]], java: JavaRuntime, cache_dir: Path
) -> tuple[list[str], list[list[str]]]:
    """PTB-tokenize all captions in one Java run: space-joined, lower-cased tokens without punctuation."""
    # The tokenizer works line by line, so a caption's own line breaks would shift every later caption.
    flat = [" ".join(text.split()) for text in [*candidates, *(ref for refs in references for ref in refs)]]
    with _accepting_java(java):
        tokens = ptb_tokenize_batch(flat, cache_path=str(cache_dir), java_path=java.executable)
    joined = iter(" ".join(words) for words in tokens)
    tok_candidates = [next(joined) for _ in candidates]
    tok_references = [[next(joined) for _ in refs] for refs in references]
    return tok_candidates, tok_references


def _python_scores(candidates: list[str], references: list[list[str]]) -> dict:
    """The metrics aac-metrics computes in Python, on tokenized text."""
    corpus, per_clip = cider_d(candidates, references)
    return {
        "cider_d": corpus["cider_d"].item(),
        "cider_d_per_clip": per_clip["cider_d"].tolist(),
        "bleu_4": bleu_4(candidates, references, False).item(),
        "rouge_l": rouge_l(candidates, references, False).item(),
    }


def _spice(candidates: list[str], references: list[list[str]], java: JavaRuntime, cache_dir: Path) -> float:
    """Corpus SPICE F-score; MetricUnavailable when its jars or a Java it runs on are missing."""
    install = locate_spice(java, list(dict.fromkeys([cache_dir, Path(get_default_cache_path())])))
    return spice(candidates, references, False, cache_path=str(install), java_path=java.executable).item()


@contextmanager
def _accepting_java(java: JavaRuntime) -> Iterator[None]:
    """Let aac-metrics run its jars on `java` although it is newer than aac-metrics' Java 13 bound.

    aac-metrics checks the version before every jar it starts, against a module constant read at call
    time; it offers no argument for this, so the constant is raised for the duration of the call only.
    """
    bound = aac_checks.MAX_JAVA_MAJOR_VERSION
    aac_checks.MAX_JAVA_MAJOR_VERSION = max(bound, java.major_version)
    try:
        yield
    finally:
        aac_checks.MAX_JAVA_MAJOR_VERSION = bound


def _link_if_absent(target: Path, link: Path) -> None:
    """Symlink `link` -> `target` unless a file is already there; safe when evaluations run side by side."""
    if link.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    # Build the link under a private name and rename it into place: the rename is atomic, so a
    # concurrent run sees either no file or a complete link, and two runs creating it both succeed.
    staging = link.with_name(f".{link.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    staging.symlink_to(target)
    os.replace(staging, link)


def _check_inputs(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Reject inputs the metrics would misread or silently score."""
    if isinstance(candidates, str) or not all(isinstance(text, str) for text in candidates):
        raise TypeError("candidates must be a sequence of strings, one caption per clip")
    if isinstance(references, str) or any(
        isinstance(refs, str) or not all(isinstance(ref, str) for ref in refs) for refs in references
    ):
        raise TypeError("references must hold, for each clip, a sequence of caption strings")
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} clips of references")
    # CIDEr-D weighs n-grams by inverse document frequency over clips: with one clip every weight is 0.
    if len(candidates) < 2:
        raise ValueError(f"CIDEr-D needs at least 2 clips, got {len(candidates)}")
    for index, refs in enumerate(references):
        if not refs or not all(ref.strip() for ref in refs):
            raise ValueError(f"clip {index} has no references or an empty reference caption: {refs!r}")
