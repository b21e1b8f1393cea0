"""Threshold calibration: `inspectd calibrate` chooses thresholds from scored images, versions them into the bundle
(the document itself is engines.bundle.thresholds) and applies them to a running daemon over the control protocol."""
