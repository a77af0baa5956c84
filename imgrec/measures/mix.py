"""The mix: not a measure of its own but a fusion of the single measures' similarities. Each is first normalised
against the collection's random-pair level (``Measure.baseline``: 0 = as alike as two random images, 1 = identical),
then fused by ``Config.mix_fusion`` (``imgrec.similarity.fuse_scores``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from imgrec import similarity as sim
from imgrec.measures.base import Measure

if TYPE_CHECKING:
    from imgrec.config import Config
    from imgrec.index import IndexSet

F32 = NDArray[np.float32]


class Single:
    """One measure on its own, as a fusion of one part: its similarities as they are."""

    fused = False

    def __init__(self, measure: Measure) -> None:
        self.parts = {measure.family: measure}

    def weights_on(self, idx: IndexSet) -> dict[str, float]:
        return {}

    def fuse(self, idx: IndexSet, S: Mapping[str, F32]) -> tuple[F32, dict[str, F32]]:
        (scores,) = S.values()
        return scores, {}


class Mix:
    """The fusion of ``parts`` (family -> measure) with ``weights`` (family -> weight; only those > 0 take part)."""

    family = "mix"
    distances = ("fused",)
    fused = True  # its parts search as parts of a fusion (the hash: near-duplicates only)

    def __init__(self, parts: Mapping[str, Measure], weights: Mapping[str, float], config: Config) -> None:
        self.weights = {m: v for m, v in weights.items() if v > 0}
        self.parts = {m: parts[m] for m in self.weights}
        self.config = config

    def weights_on(self, idx: IndexSet) -> dict[str, float]:
        """The weights applied on this index: under the gated fusion, colour's weight scaled by how much colour
        agrees with the content on this collection (``similarity.colour_gate``, measured at index build)."""
        weights = self.weights
        if self.config.mix_fusion != "gated" or weights.get("color", 0.0) <= 0 or \
                not any(v > 0 for m, v in weights.items() if m != "color"):
            return dict(weights)  # colour alone: what the person asked for
        agreement = idx.meta.get("color_agreement", {}).get("value")
        gate = 1.0 if agreement is None else sim.colour_gate(float(agreement), self.config.mix_gate_floor)
        return {**weights, "color": weights["color"] * gate}

    def normalise(self, idx: IndexSet, S: Mapping[str, F32]) -> dict[str, F32]:
        """Each part's similarities against its random-pair level (the hash: against the near-duplicate level)."""
        return {m: sim.normalize_to_baseline(S[m], self.parts[m].baseline(idx)) for m in S}

    def fuse(self, idx: IndexSet, S: Mapping[str, F32]) -> tuple[F32, dict[str, F32]]:
        """(the mix, the normalised scores) of per-measure similarities of any shape, the same for every part:
        per query image where they are ``(images, candidates)``; pairs of a join: their weighted mean."""
        norm = self.normalise(idx, S)
        method = self.config.mix_fusion
        if method in ("adaptive", "rrf") and not all(np.ndim(v) == 2 for v in S.values()):
            method = "weighted"  # pairs of a join: no query's candidates to adapt or rank over
        return sim.fuse_scores(norm, self.weights_on(idx), method), norm
