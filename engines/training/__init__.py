"""Training a bundle (train), measuring one (evaluate, metrics). `evaluate` and `metrics` need no torch: the
calibration tool scores and sets thresholds with them on a runtime-only station."""
