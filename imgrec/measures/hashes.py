"""The perceptual hash measure: pHash and dHash, 64 bits each, compared by Hamming distance over both (128 bits)
or either alone. Candidates come from an exact popcount scan (or, in a mix on a large lake, the multi-index hashing
table of the near-duplicate radius): hashes find copies, not look-alikes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from imgrec import similarity as sim
from imgrec.measures.base import Measure, QueryFeatures, Rows

if TYPE_CHECKING:
    from imgrec.index import IndexSet

WORDS = {"phash+dhash": slice(0, 2), "phash": slice(0, 1), "dhash": slice(1, 2)}  # the 64-bit words read


class PerceptualHash(Measure):
    family = "hash"
    distances = tuple(WORDS)
    feature = "hashes"
    graph = None
    near_duplicates_in_mix = True

    @property
    def cols(self) -> slice:
        """The hash words this distance reads (a slice: the memory-mapped matrix is viewed, never copied)."""
        return WORDS[self.distance]

    @property
    def bits(self) -> int:
        return 64 * (self.cols.stop - self.cols.start)

    @classmethod
    def stored(cls, idx: IndexSet, row: int) -> NDArray[np.uint64]:
        return np.asarray(idx.hashes[row])

    @classmethod
    def centroid(cls, values: Sequence[NDArray[Any]]) -> NDArray[np.uint64]:
        """The bitwise majority, which minimises the summed Hamming distance."""
        bits = np.unpackbits(np.stack(values).astype(">u8").view(np.uint8), axis=1)
        return np.packbits(2 * bits.sum(axis=0) > len(values)).view(">u8").astype(np.uint64)

    def baseline(self, idx: IndexSet) -> float:
        """In a mix the hash is near-duplicate evidence: its 0 is ``near_duplicate_bits`` of 128 away."""
        return 1.0 - self.config.near_duplicate_bits / 128

    def near_radius(self) -> int:
        """The radius in bits within which a mix's hash finds its own candidates (``near_candidate_bits`` per 128,
        at most ``near_duplicate_bits``)."""
        bits = min(self.config.near_candidate_bits, self.config.near_duplicate_bits)
        return bits * (self.cols.stop - self.cols.start) // 2

    def prepare(self, idx: IndexSet, *, wait: bool = False) -> None:
        """The near-duplicate radius table a mix uses on a large lake (``IndexSet.radius_index``)."""
        idx.radius_index(self.cols, self.near_radius(), now=True, wait=wait)

    def candidates(self, idx: IndexSet, queries: Sequence[QueryFeatures], count: int, *, ef: int, threads: int,
                   fused: bool = False) -> list[Rows]:
        """An exact Hamming scan per query image; in a mix (``fused``) only the images within the near-duplicate
        radius (usually none or a few), found by the radius table where the lake has one (the same rows)."""
        return [self._near(idx, q.values["hashes"], count) if fused else self._nearest(idx, q.values["hashes"], count)
                for q in queries]

    def _nearest(self, idx: IndexSet, hashes: NDArray[np.uint64], count: int) -> Rows:
        d = sim.hamming_distance(hashes[self.cols], idx.hash_columns[:, self.cols])
        if count >= d.size:
            return np.arange(d.size, dtype=np.int64)
        return np.argpartition(d, count - 1)[:count].astype(np.int64)

    def _near(self, idx: IndexSet, hashes: NDArray[np.uint64], count: int) -> Rows:
        radius = self.near_radius()
        table = idx.radius_index(self.cols, radius)
        if table is not None:  # multi-index hashing: the same rows as the scan below, 5x faster at 400k
            close, dc = table.query(hashes[self.cols])
        else:
            d = sim.hamming_distance(hashes[self.cols], idx.hash_columns[:, self.cols])
            close = np.flatnonzero(d <= radius)
            dc = d[close]
        if close.size > count:
            close = close[np.argpartition(dc, count - 1)[:count]]
        return close.astype(np.int64)

    def similarities(self, idx: IndexSet, queries: Sequence[QueryFeatures], pool: Rows) -> NDArray[np.float32]:
        X = np.asarray(idx.hashes[pool][:, self.cols])
        return np.stack([sim.to_similarity("hash", self.distance,
                                           sim.hamming_distance(q.values["hashes"][self.cols], X), dim=self.bits)
                         for q in queries])

    def join_state(self, idx: IndexSet) -> NDArray[np.uint64]:
        """Every hash, in memory (16 bytes an image)."""
        return np.ascontiguousarray(idx.hashes)

    def pairs(self, idx: IndexSet, state: Any, a: Rows, b: Rows) -> NDArray[np.float32]:
        ham = np.bitwise_count(state[a][:, self.cols] ^ state[b][:, self.cols]).sum(axis=1)
        return sim.to_similarity("hash", self.distance, ham, dim=self.bits)

    def dense(self, idx: IndexSet, a: Rows, r: Rows) -> NDArray[np.float32]:
        ha, hr = np.asarray(idx.hashes[a]), np.asarray(idx.hashes[r])
        ham = np.zeros((a.size, r.size), np.int32)
        for w in range(self.cols.start, self.cols.stop):
            ham += np.bitwise_count(ha[:, None, w] ^ hr[None, :, w])
        return (1.0 - ham / float(self.bits)).astype(np.float32)
