"""Multi-index hashing over packed perceptual hashes (Norouzi, Punjani & Fleet, CVPR 2012): exact Hamming-radius
search without comparing every pair (:func:`near_pairs`, the Collection page's near-duplicate groups) or every row
(:class:`RadiusIndex`, the near-duplicate candidates of a mix search).

The hash bits are dealt into ``m`` disjoint chunks; two hashes within ``t`` bits of each other are within
``floor(t / m)`` bits of each other on at least one chunk (pigeonhole), so only the rows that share a bucket within
that radius on some chunk need their whole hash compared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
from numpy.typing import NDArray

_MAX_CHUNK_BITS = 22  # dense bucket tables of at most 4M entries per chunk
_BLOCK_PAIRS = 4_000_000  # candidate pairs verified per numpy step (bounds memory on skewed data)


def hamming(a: NDArray[np.uint64], b: NDArray[np.uint64]) -> NDArray[np.int64]:
    """Row-wise Hamming distance between two (n, words) uint64 arrays."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=1, dtype=np.int64)


@dataclass(frozen=True)
class ChunkPlan:
    """How :func:`near_pairs` cuts the hash: ``chunks`` lists the bit positions of each chunk, ``radius`` the
    Hamming radius probed per chunk, ``est_candidates`` the pairs it expects to verify."""

    chunks: tuple[tuple[int, ...], ...]
    radius: int
    est_candidates: float
    est_cost: float


def _esym(x: NDArray[np.float64], r: int) -> float:
    """Sum of the elementary symmetric polynomials of ``x`` of degrees 0..r."""
    if r == 0:
        return 1.0
    e = np.zeros(r + 1)
    e[0] = 1.0
    for v in x:
        e[1:] = e[1:] + v * e[:-1]
    return float(e.sum())


def plan_chunks(bit_means: NDArray[np.float64], max_distance: int, n: int, *, max_chunk_bits: int = _MAX_CHUNK_BITS,
                per_query: bool = False) -> ChunkPlan:
    """The multi-index scheme with the least expected work for ``n`` hashes whose bits are 1 with ``bit_means``.

    The bit positions are dealt into ``m`` disjoint chunks, the most informative bits (mean nearest 0.5) spread
    evenly over them; two hashes within ``t`` bits of each other are within ``floor(t / m)`` bits on at least one
    chunk (pigeonhole), so probing, per chunk, every bucket within that radius of a hash's chunk finds every pair.
    Work: the probes (``n m K``, K buckets per ball) plus the candidates that share a probed bucket, estimated from
    the bit means (as if bits were independent), each verified on the whole hash. ``per_query``: the work of one
    query against the ``n`` hashes instead (its probes and its candidates; ``est_candidates`` per query).
    """
    p = np.clip(np.asarray(bit_means, dtype=np.float64), 0.0, 1.0)
    bits = p.size
    same = p**2 + (1 - p) ** 2  # two random hashes agree on the bit
    ratio = (1 - same) / np.maximum(same, 1e-12)
    ranked = np.argsort(np.abs(p - 0.5), kind="stable")  # most informative first
    best: ChunkPlan | None = None
    # more than t + 1 chunks only narrows them (more candidates) at the same radius 0
    least = math.ceil(bits / max_chunk_bits)
    for m in range(least, max(least, min(bits, max_distance + 1)) + 1):
        r = max_distance // m
        if r > 3:
            continue
        chunks = tuple(tuple(sorted(int(b) for b in ranked[c::m])) for c in range(m))
        probes = sum(sum(math.comb(len(ch), i) for i in range(r + 1)) for ch in chunks)
        pairs = sum(float(np.prod(same[list(ch)])) * _esym(ratio[list(ch)], r) for ch in chunks)
        if per_query:
            candidates = pairs * n
            cost = probes * 20.0 + candidates * 10.0  # ns-ish: a probe (two table reads), a verified candidate
        else:
            candidates = pairs * n * (n - 1) / 2.0
            cost = n * probes * 1.0 + candidates * 8.0 + probes * 5e4  # ns-ish: a probe, a verification, a pass
        if best is None or cost < best.est_cost:
            best = ChunkPlan(chunks, r, candidates, cost)
    if best is None:  # a threshold so large that nothing prunes: bits as chunks, a radius that still covers it
        chunks = tuple((b,) for b in range(bits))
        return ChunkPlan(chunks, max_distance // bits, n * (n - 1) / 2.0, float("inf"))
    return best


def _chunk_values(H: NDArray[np.uint64], positions: Sequence[int]) -> NDArray[np.int32]:
    """The bits ``positions`` (bit p is bit p % 64 of word p // 64) of each row of H, packed into integers."""
    out = np.zeros(H.shape[0], dtype=np.uint64)
    for k, pos in enumerate(positions):
        word, bit = divmod(int(pos), 64)
        out |= ((H[:, word] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(k)
    return out.astype(np.int32)


def _flip_masks(width: int, radius: int) -> list[int]:
    masks = []
    for r in range(radius + 1):
        for bits in combinations(range(width), r):
            masks.append(sum(1 << b for b in bits))
    return masks


def bit_means(H: NDArray[np.uint64]) -> NDArray[np.float64]:
    """The fraction of rows with each bit set (bit p is bit p % 64 of word p // 64)."""
    H = np.asarray(H, dtype=np.uint64).reshape(H.shape[0], -1)
    shifts = np.arange(64, dtype=np.uint64)
    sample = H[:: max(1, H.shape[0] // 100_000)]
    return np.concatenate([((sample[:, w, None] >> shifts) & np.uint64(1)).mean(axis=0)
                           for w in range(H.shape[1])])


def near_pairs(hashes: NDArray[np.uint64], max_distance: int, *, stats: dict[str, Any] | None = None
               ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Every pair of rows of ``hashes`` (n, words) within ``max_distance`` bits: (i, j, distance), i < j.

    Exact (the same pairs as comparing all n^2 pairs, tested) but without comparing all pairs: multi-index hashing
    (:func:`plan_chunks`): per chunk a dense bucket table; every row probes the buckets within the chunk radius of
    its own, and only the rows found there are compared on the whole hash. Duplicate rows are fine (distance 0).
    """
    H = np.ascontiguousarray(hashes, dtype=np.uint64)
    H = H.reshape(H.shape[0], -1)
    n = H.shape[0]
    empty = np.empty(0, np.int64)
    if n < 2 or max_distance < 0:
        return empty, empty, empty
    t = int(max_distance)
    plan = plan_chunks(bit_means(H), t, n)
    if stats is not None:
        stats.update(chunks=len(plan.chunks), radius=plan.radius, est_candidates=int(plan.est_candidates),
                     candidates=0)
    found_i, found_j = [], []
    words = [np.ascontiguousarray(H[:, w]) for w in range(H.shape[1])]  # 1-D columns verify fastest
    for positions in plan.chunks:
        v = _chunk_values(H, positions)
        order = np.argsort(v, kind="stable")
        counts = np.bincount(v, minlength=1 << len(positions))
        starts = np.cumsum(counts) - counts
        occupied = (counts > 0).view(np.uint8)  # a small table for the probes, which mostly miss
        for mask in _flip_masks(len(positions), plan.radius):
            if mask == 0:  # the own bucket holds the row itself: it needs another row to make a pair
                rows = np.flatnonzero(counts[v] > 1)
                q = v
            else:  # probe from the side whose chunk has a 0 at the mask's top bit: each bucket pair once
                q = v ^ mask
                top = 1 << (mask.bit_length() - 1)
                rows = np.flatnonzero(occupied[q] & ((v & top) == 0))
            if rows.size == 0:
                continue
            qr = q[rows]
            cnt = counts[qr]
            cum = np.cumsum(cnt)  # expand at most about _BLOCK_PAIRS candidates per step
            cuts = np.searchsorted(cum, np.arange(_BLOCK_PAIRS, int(cum[-1]), _BLOCK_PAIRS), side="right")
            for sel in np.split(np.arange(rows.size), cuts):
                if sel.size == 0:
                    continue
                k = cnt[sel]
                if mask and k.max() == 1:  # the common case: one row in the probed bucket
                    a, b = rows[sel], order[starts[qr[sel]]]
                else:
                    a = np.repeat(rows[sel], k)
                    offs = np.arange(a.size, dtype=np.int64) - np.repeat(np.cumsum(k) - k, k)
                    b = order[np.repeat(starts[qr[sel]], k) + offs]
                    if mask == 0:
                        keep = a < b  # each pair of the bucket once, never a row with itself
                        a, b = a[keep], b[keep]
                if stats is not None:
                    stats["candidates"] += int(a.size)
                d = np.bitwise_count(words[0][a] ^ words[0][b])
                for col in words[1:]:
                    d += np.bitwise_count(col[a] ^ col[b])
                ok = d <= t
                a, b = a[ok], b[ok]
                found_i.append(np.minimum(a, b))
                found_j.append(np.maximum(a, b))
    if not found_i:
        return empty, empty, empty
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    key = np.unique(i * n + j)
    i, j = key // n, key % n
    return i, j, hamming(H[i], H[j])


def synthetic_hashes(n: int, words: int = 2, copies: float = 0.1, max_flips: int = 6, seed: int = 0
                     ) -> NDArray[np.uint64]:
    """``n`` random hashes of ``words`` x 64 bits, of which a fraction ``copies`` are copies of others with 0 to
    ``max_flips`` bits flipped (the benchmark's stand-in for a collection with near-duplicates)."""
    rng = np.random.default_rng(seed)
    H = rng.integers(0, 2**64, (n, words), dtype=np.uint64, endpoint=False)
    k = int(n * copies)
    if k and n > k:
        src = rng.integers(0, n - k, k)
        H[n - k:] = H[src]
        flips = rng.integers(0, max_flips + 1, k)
        for f in range(1, max_flips + 1):
            rows = np.flatnonzero(flips >= f) + (n - k)
            pos = rng.integers(0, 64 * words, rows.size)
            H[rows, pos // 64] ^= np.uint64(1) << (pos % 64).astype(np.uint64)
    return H


@dataclass(frozen=True)
class RadiusIndex:
    """Every row within ``radius`` bits of a query hash, exactly, by multi-index hashing.

    Per chunk of a per-query :func:`plan_chunks` (at most 16 bits a chunk), the rows sorted by their chunk value and
    a dense table of where each value's rows start (400,000 rows of 128 bits at radius 16: 9 chunks of 14-15 bits,
    one flipped bit probed, 15 MB). A query reads the buckets within the chunk radius of its own value in every
    chunk at once (all chunks' tables are laid end to end) and compares the whole hash of the rows found there only.
    Where those buckets hold more than ``max_share`` of the rows (hashes of flat, featureless images crowd a few
    buckets), a plain scan is cheaper and is what runs.
    """

    hashes: NDArray[np.uint64]  # (n, words), contiguous
    radius: int
    plan: ChunkPlan
    table: NDArray[np.int32]  # every chunk's 2^bits + 1 bucket starts, end to end, pointing into ``order``
    order: NDArray[np.int32]  # per chunk (n each, end to end): the rows by chunk value
    positions: NDArray[np.intp]  # (chunks, widest): each chunk's bit positions (padded with a bit that is always 0)
    probe_chunk: NDArray[np.intp]  # per probe: its chunk
    probe_base: NDArray[np.int32]  # per probe: where its chunk's table starts in ``table``
    probe_mask: NDArray[np.int32]  # per probe: the bits it flips (every flip of at most plan.radius bits)
    max_share: float = 0.25

    @classmethod
    def build(cls, hashes: NDArray[np.uint64], radius: int) -> RadiusIndex:
        H = np.ascontiguousarray(hashes, dtype=np.uint64)
        H = H.reshape(H.shape[0], -1)
        n, bits = H.shape[0], 64 * H.shape[1]
        means = bit_means(H) if n else np.full(bits, 0.5)
        plan = plan_chunks(means, int(radius), max(n, 2), max_chunk_bits=16, per_query=True)
        tables, orders, base = [], [], 0
        positions = np.full((len(plan.chunks), max(len(p) for p in plan.chunks)), bits, dtype=np.intp)
        chunk, pbase, pmask = [], [], []
        for c, pos in enumerate(plan.chunks):
            v = _chunk_values(H, pos)
            orders.append(np.argsort(v, kind="stable").astype(np.int32))
            table = np.empty((1 << len(pos)) + 1, dtype=np.int64)
            table[0] = 0
            np.cumsum(np.bincount(v, minlength=1 << len(pos)), out=table[1:])
            tables.append((table + c * n).astype(np.int32))
            positions[c, : len(pos)] = pos
            masks = _flip_masks(len(pos), plan.radius)
            chunk += [c] * len(masks)
            pbase += [base] * len(masks)
            pmask += masks
            base += table.size
        return cls(H, int(radius), plan, np.concatenate(tables), np.concatenate(orders), positions,
                   np.asarray(chunk, np.intp), np.asarray(pbase, np.int32), np.asarray(pmask, np.int32))

    @property
    def nbytes(self) -> int:
        return self.table.nbytes + self.order.nbytes + self.probe_mask.nbytes * 3

    def query(self, q: NDArray[np.uint64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """(rows, distances) of every row within ``radius`` bits of ``q`` (words,), rows ascending."""
        n = self.hashes.shape[0]
        q = np.asarray(q, dtype=np.uint64).reshape(1, -1)
        bits = np.zeros(64 * q.shape[1] + 1, dtype=np.int32)  # the last one: the padding bit
        bits[:-1] = ((q[0][:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).ravel()
        own = (bits[self.positions] << np.arange(self.positions.shape[1], dtype=np.int32)).sum(axis=1,
                                                                                               dtype=np.int32)
        keys = self.probe_base + (self.probe_mask ^ own[self.probe_chunk])
        lo = self.table[keys]
        k = self.table[keys + 1] - lo
        total = int(k.sum())
        if total > self.max_share * n:
            rows = np.arange(n, dtype=np.int64)
        else:  # (a row found in several chunks is verified several times: cheaper than deduplicating first)
            rows = self.order[np.repeat(lo - (np.cumsum(k) - k), k) + np.arange(total)].astype(np.int64)
        d = hamming(self.hashes[rows], q)
        near = d <= self.radius
        rows, first = np.unique(rows[near], return_index=True)
        return rows, d[near][first]


def query_many(index: RadiusIndex, Q: NDArray[np.uint64]) -> tuple[NDArray[np.int64], NDArray[np.int64],
                                                                   NDArray[np.int64]]:
    """``RadiusIndex.query`` for a batch of query hashes (m, words) at once, without a Python loop per query:
    (query positions, rows, distances) of every (query, row) within the radius, each pair once."""
    n = index.hashes.shape[0]
    Q = np.asarray(Q, dtype=np.uint64).reshape(len(Q), -1)
    empty = np.empty(0, np.int64)
    if Q.shape[0] == 0 or n == 0:
        return empty, empty, empty
    shifts = np.arange(64, dtype=np.uint64)
    bits = np.zeros((Q.shape[0], 64 * Q.shape[1] + 1), dtype=np.int32)  # the last column: the padding bit
    bits[:, :-1] = ((Q[:, :, None] >> shifts) & np.uint64(1)).reshape(Q.shape[0], -1)
    weights = np.arange(index.positions.shape[1], dtype=np.int32)
    own = (bits[:, index.positions] << weights).sum(axis=2, dtype=np.int32)  # (m, chunks)
    keys = index.probe_base[None, :] + (index.probe_mask[None, :] ^ own[:, index.probe_chunk])  # (m, probes)
    lo = index.table[keys]
    k = index.table[keys + 1] - lo
    per_query = k.sum(axis=1)
    scan = per_query > index.max_share * n  # crowded buckets: those queries scan every row instead
    qs, rows = [], []
    if (~scan).any():
        sel = ~scan
        kk, ll = k[sel].ravel(), lo[sel].ravel()
        total = int(kk.sum())
        qpos = np.repeat(np.repeat(np.flatnonzero(sel), k.shape[1]), kk)
        offs = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(kk) - kk, kk)
        qs.append(qpos)
        rows.append(index.order[np.repeat(ll, kk) + offs].astype(np.int64))
    for q in np.flatnonzero(scan):
        qs.append(np.full(n, q, np.int64))
        rows.append(np.arange(n, dtype=np.int64))
    qi, ri = np.concatenate(qs), np.concatenate(rows)
    d = np.bitwise_count(index.hashes[ri, 0] ^ Q[qi, 0]).astype(np.int64)
    for w in range(1, Q.shape[1]):
        d += np.bitwise_count(index.hashes[ri, w] ^ Q[qi, w])
    near = d <= index.radius
    qi, ri, d = qi[near], ri[near], d[near]
    key, first = np.unique(qi * n + ri, return_index=True)  # a row found in several chunks: once
    return key // n, key % n, d[first]
