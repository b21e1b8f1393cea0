"""The frozen baseline: ImageNet backbone taps, concatenated at the finest tap's stride; nothing is trained.

Default scorer: the Gaussian. Its per-location mean and shared covariance model the batch-to-batch variation of a
surface far better than a few k-means references: on magnetic tile it beats k-means with k = 1..8 by a wide margin in
image AUROC (docs/ACCURACY.md).
"""

from __future__ import annotations

from engines.model.graph import TapConcat
from engines.model.methods import Method


class FrozenMethod(Method):
    name = "frozen"
    default_scorer = "gaussian"

    def build_head(self, backbone, config):
        return TapConcat()
