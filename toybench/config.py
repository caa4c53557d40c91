"""Configuration of the toy benchmark: one flat dataclass of plain types, and named size presets."""

from dataclasses import asdict, dataclass, replace

PRESETS: dict[str, dict[str, int]] = {
    # About 3 h of audio per task: enough for the toy teacher and student to learn both tasks.
    "default": {"n_train": 3000, "n_valid": 300, "n_test": 300},
    # Seconds to generate: for tests and pipeline smoke runs.
    "smoke": {"n_train": 48, "n_valid": 12, "n_test": 12},
}


@dataclass(frozen=True)
class ToyBenchConfig:
    """Everything that decides the generated files, plus how many processes make them."""

    seed: int = 0
    """Master seed; each clip's randomness derives from (seed, task, split, index)."""
    n_train: int = 3000
    """Clips per task (ASR and AAC each) in the train split."""
    n_valid: int = 300
    """Clips per task in the valid split."""
    n_test: int = 300
    """Clips per task in the test split."""
    min_duration_s: float = 1.0
    """Shortest clip, seconds; shorter speech or scenes get trailing silence."""
    max_duration_s: float = 8.0
    """Longest clip, seconds; longer draws are redrawn."""
    flite_prob: float = 0.25
    """Probability that an ASR clip is spoken by flite rather than espeak-ng."""
    noise_prob: float = 0.3
    """Probability that an ASR clip gets white, pink or brown background noise."""
    snr_db_min: float = 5.0
    """Lowest speech-to-noise ratio of noisy ASR clips, dB."""
    snr_db_max: float = 25.0
    """Highest speech-to-noise ratio of noisy ASR clips, dB."""
    workers: int = 2
    """Worker processes; the output is identical for any number."""

    def __post_init__(self) -> None:
        if min(self.n_train, self.n_valid, self.n_test) < 1:
            raise ValueError("every split needs at least one clip per task")
        if not 0.5 <= self.min_duration_s < self.max_duration_s:
            raise ValueError("need 0.5 <= min_duration_s < max_duration_s")
        if self.max_duration_s < 6.0:
            # Three events with their gaps can need up to 6 s, and a long sentence spoken slowly too.
            raise ValueError("max_duration_s must be at least 6 s")
        if not (0.0 <= self.flite_prob <= 1.0 and 0.0 <= self.noise_prob <= 1.0):
            raise ValueError("flite_prob and noise_prob are probabilities")
        if self.snr_db_min > self.snr_db_max:
            raise ValueError("snr_db_min must not exceed snr_db_max")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")

    def counts(self) -> dict[str, int]:
        """Clips per task in each split."""
        return {"train": self.n_train, "valid": self.n_valid, "test": self.n_test}

    def data_fields(self) -> dict[str, int | float]:
        """The fields that decide the output (all but `workers`); stored in the manifest."""
        fields = asdict(self)
        del fields["workers"]
        return fields


def preset(name: str, **overrides: int | float) -> ToyBenchConfig:
    """The config of a named size preset ("default" or "smoke"), with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown toybench size {name!r}; choose one of {sorted(PRESETS)}")
    return replace(ToyBenchConfig(**PRESETS[name]), **overrides)
