"""The measures: one class per measure behind one interface (``Measure``), and the mix that fuses them.

To add a measure: a module here with a ``Measure`` subclass (its family, distances, feature, graph and the methods
``stored``, ``similarities``, ``pairs``, ``dense``; ``candidates`` comes from its graph unless it scans), and its
class in ``REGISTRY``. The engine, the joins, the evaluation and the bench reach it through ``resolve``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from imgrec.measures.base import Measure, MeasureError, QueryFeatures, Rows
from imgrec.measures.embedding import Embedding
from imgrec.measures.hashes import PerceptualHash
from imgrec.measures.histogram import ColourHistogram
from imgrec.measures.layout import ColourLayout
from imgrec.measures.mix import Mix, Single

if TYPE_CHECKING:
    from imgrec.config import Config
    from imgrec.index import IndexSet

__all__ = ["DISTANCES", "MEASURES", "REGISTRY", "SINGLES", "ColourHistogram", "ColourLayout", "Embedding", "Measure",
           "MeasureError", "Mix", "PerceptualHash", "QueryFeatures", "Rows", "Selection", "Single", "default_distance",
           "distances_on", "features_on", "mix", "resolve", "select", "singles"]

REGISTRY: tuple[type[Measure], ...] = (ColourLayout, ColourHistogram, PerceptualHash, Embedding)
MEASURES = ("color", "hash", "embedding", "mix")  # what a person picks
SINGLES = ("embedding", "color", "hash")  # the single measures, in the order results list their scores
DISTANCES: dict[str, tuple[str, ...]] = {
    **{m: tuple(d for cls in REGISTRY if cls.family == m for d in cls.distances) for m in MEASURES if m != "mix"},
    "mix": Mix.distances,
}


_CLASSES = {(cls.family, d): cls for cls in REGISTRY for d in cls.distances}


def _class(measure: str, distance: str) -> type[Measure]:
    return _CLASSES[measure, distance]


def distances_on(idx: IndexSet | None, measure: str) -> list[str]:
    """The distances of a measure this index can serve (its default first)."""
    if measure == "mix":
        return list(Mix.distances)
    return [d for d in DISTANCES[measure] if _class(measure, d).available(idx)]


def default_distance(idx: IndexSet | None, measure: str) -> str:
    """A measure's default distance on this index: the first of ``DISTANCES`` that it can serve (colour: the layout
    where the index has it, else the histogram's Hellinger distance)."""
    return distances_on(idx, measure)[0]


def resolve(idx: IndexSet | None, measure: str, distance: str | None, config: Config) -> Measure:
    """The single measure ``measure`` with ``distance`` (None: its default) on this index; MeasureError where the
    name, the distance or the index does not allow it."""
    if measure not in DISTANCES or measure == "mix":
        raise MeasureError(f"unknown measure {measure!r}: choose one of {', '.join(MEASURES)}")
    distance = distance or default_distance(idx, measure)
    if distance not in DISTANCES[measure]:
        raise MeasureError(f"{measure} offers the distances {', '.join(DISTANCES[measure])}, not {distance!r}")
    cls = _class(measure, distance)
    if not cls.available(idx):
        raise MeasureError(cls.unavailable or f"this index has no {measure} {distance}")
    return cls(distance, config)


def singles(idx: IndexSet | None, config: Config, chosen: Measure | None = None) -> dict[str, Measure]:
    """Every single measure on this index: ``chosen`` for its family, the others at their default distance (what
    a result's per-measure scores are)."""
    return {m: chosen if chosen is not None and chosen.family == m else resolve(idx, m, None, config)
            for m in SINGLES}


def mix(idx: IndexSet | None, config: Config, weights: dict[str, float] | None = None) -> Mix:
    """The mix of the single measures at their default distances, with ``weights`` (default: the config's)."""
    return Mix(singles(idx, config), config.weights if weights is None else weights, config)


@dataclass(frozen=True)
class Selection:
    """What one search uses: ``fusion`` (a ``Mix``, or a ``Single`` measure) whose parts are searched and fused;
    ``singles``: every single measure, the searched one at its distance (the per-measure scores of the results);
    ``distance``: the response's distance ("fused" for the mix)."""

    fusion: Mix | Single
    singles: dict[str, Measure]
    distance: str


def select(idx: IndexSet | None, measure: str, distance: str | None, weights: dict[str, float], config: Config
           ) -> Selection:
    """The measures of a search of ``measure`` (a single one, or "mix" with ``weights``) with ``distance``."""
    if measure == "mix":
        if distance not in (None, *Mix.distances):
            raise MeasureError(f"mix offers the distances {', '.join(Mix.distances)}, not {distance!r}")
        unknown = sorted(set(weights) - set(SINGLES))
        if unknown:
            raise MeasureError(f"mix weights name unknown measures ({', '.join(unknown)}): use {', '.join(SINGLES)}")
        parts = singles(idx, config)
        fusion = Mix(parts, weights, config)
        if not fusion.parts:
            raise MeasureError("mix needs at least one measure with a positive weight")
        return Selection(fusion, parts, Mix.distances[0])
    chosen = resolve(idx, measure, distance, config)
    return Selection(Single(chosen), singles(idx, config, chosen), chosen.distance)


def features_on(idx: IndexSet | None) -> list[type[Measure]]:
    """One measure class per feature this index holds: what a query image's features are."""
    seen: dict[str, type[Measure]] = {}
    for cls in REGISTRY:
        if cls.available(idx):
            seen.setdefault(cls.feature, cls)
    return list(seen.values())
