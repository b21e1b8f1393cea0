"""The frozen baseline: ImageNet backbone taps, concatenated at the finest tap's stride; nothing is trained.

Default scorer: the Gaussian. Measured on magnetic_tile (Lite0, 256x256, 692 train/good fitted, 575 test images,
/tmp measurement script described in the model-core report): image AUROC 0.859 and pixel AUROC 0.736 for the
Gaussian, against 0.678/0.711/0.709/0.691 image AUROC for k-means with k = 1/2/4/8.
"""

from __future__ import annotations

from engines.model.graph import TapConcat
from engines.model.methods import Method


class FrozenMethod(Method):
    name = "frozen"
    default_scorer = "gaussian"

    def build_head(self, backbone, config):
        return TapConcat()
