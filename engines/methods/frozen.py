"""The frozen baseline: ImageNet backbone taps, concatenated at the finest tap's stride; nothing is trained."""

from __future__ import annotations

from engines.graph import TapConcat
from engines.methods import Method


class FrozenMethod(Method):
    name = "frozen"
    default_scorer = "kmeans"

    def build_head(self, backbone, config):
        return TapConcat()
