"""Threshold calibration: thresholds files with versions, provenance and history, and `inspectd calibrate`."""
