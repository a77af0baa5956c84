"""Unit tests for imgrec.similarity against naive reference implementations.

Every reference below is written with plain Python loops over Python floats and the ``math`` module (no numpy
vectorisation), so a vectorisation or broadcasting mistake in the library cannot be mirrored in its reference.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest
from scipy.optimize import linprog
from scipy.stats import wasserstein_distance

import imgrec.similarity as sim

SEEDS = (0, 1, 2)
BINS = (8, 4, 4)
HIST_FUNCS = {
    "chi2": sim.chi2_distance,
    "hellinger": sim.hellinger_distance,
    "intersection": sim.intersection_distance,
    "emd": sim.emd_distance,
}


# --- helpers ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def no_warnings():
    """Fail on any Python warning and on any numpy floating-point error except underflow."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(divide="raise", over="raise", invalid="raise", under="ignore"):
            yield


def rows(X: np.ndarray) -> list[list[float]]:
    return [[float(v) for v in row] for row in np.atleast_2d(X)]


def vec(x: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(x).reshape(-1)]


def random_hists(rng: np.random.Generator, n: int, d: int, sparse: bool = False) -> np.ndarray:
    """``n`` L1-normalised float32 histograms; ``sparse`` zeroes about 60% of the bins (exercises 0/0 bins)."""
    h = rng.random((n, d))
    if sparse:
        h = h * (rng.random((n, d)) < 0.4)
        h[:, rng.integers(d)] += 0.1  # never all-zero
    return (h / h.sum(axis=1, keepdims=True)).astype(np.float32)


def check_case(seed: int, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.normal(size=d).astype(np.float32)
    X = rng.normal(size=(n, d)).astype(np.float32)
    return q, X


# --- naive references -------------------------------------------------------------------------------------------------


def ref_cosine(q: list[float], x: list[float]) -> float:
    dot = sum(a * b for a, b in zip(q, x, strict=True))
    nq = math.sqrt(sum(a * a for a in q))
    nx = math.sqrt(sum(b * b for b in x))
    return 0.0 if nq == 0 or nx == 0 else dot / (nq * nx)


def ref_euclidean(q: list[float], x: list[float]) -> float:
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(q, x, strict=True)))


def ref_manhattan(q: list[float], x: list[float]) -> float:
    return sum(abs(a - b) for a, b in zip(q, x, strict=True))


def ref_chi2(q: list[float], x: list[float]) -> float:
    total = 0.0
    for a, b in zip(q, x, strict=True):
        if a + b > 0:
            total += (a - b) ** 2 / (a + b)
    return 0.5 * total


def ref_hellinger(q: list[float], x: list[float]) -> float:
    bc = sum(math.sqrt(a * b) for a, b in zip(q, x, strict=True))
    return math.sqrt(max(0.0, 1.0 - bc))


def ref_hellinger_l2(q: list[float], x: list[float]) -> float:
    """||sqrt(a) - sqrt(b)||_2 / sqrt(2): the same distance on normalised histograms, numerically stable near 0."""
    return math.sqrt(sum((math.sqrt(a) - math.sqrt(b)) ** 2 for a, b in zip(q, x, strict=True))) / math.sqrt(2.0)


def ref_intersection(q: list[float], x: list[float]) -> float:
    return 1.0 - sum(min(a, b) for a, b in zip(q, x, strict=True))


def marginals(h: list[float], bins: tuple[int, int, int] = BINS) -> tuple[list[float], list[float], list[float]]:
    nh, ns, nv = bins
    hue, sat, val = [0.0] * nh, [0.0] * ns, [0.0] * nv
    for i in range(nh):
        for j in range(ns):
            for k in range(nv):
                m = h[(i * ns + j) * nv + k]
                hue[i] += m
                sat[j] += m
                val[k] += m
    return hue, sat, val


def cumdiff(a: list[float], b: list[float]) -> list[float]:
    out, acc = [], 0.0
    for x, y in zip(a, b, strict=True):
        acc += x - y
        out.append(acc)
    return out


def ref_emd_linear(a: list[float], b: list[float]) -> float:
    """Normalised 1-D EMD on a line of n bins: sum |CDF_a - CDF_b| / (n - 1)."""
    n = len(a)
    F = cumdiff(a, b)
    return sum(abs(f) for f in F[: n - 1]) / max(n - 1, 1)


def ref_emd_circular(a: list[float], b: list[float]) -> float:
    """Normalised 1-D EMD on a circle of n bins: min over real shifts c of sum |F_i - c|, divided by n / 2.

    The objective is convex and piecewise linear in c with breakpoints at the F_i, so its minimum is at one of them:
    trying every F_i as c is an exhaustive search.
    """
    n = len(a)
    F = cumdiff(a, b)
    return min(sum(abs(f - c) for f in F) for c in F) / (n / 2)


def ref_emd(q: list[float], x: list[float], bins: tuple[int, int, int] = BINS) -> float:
    (qh, qs, qv), (xh, xs, xv) = marginals(q, bins), marginals(x, bins)
    return (ref_emd_circular(xh, qh) + ref_emd_linear(xs, qs) + ref_emd_linear(xv, qv)) / 3.0


def lp_emd(a: list[float], b: list[float], circular: bool) -> float:
    """Optimal transport cost by linear programming (independent of any CDF formula), unnormalised."""
    n = len(a)
    cost = []
    for i in range(n):
        for j in range(n):
            d = abs(i - j)
            cost.append(min(d, n - d) if circular else d)
    A, rhs = [], []
    for i in range(n):  # row sums = a
        A.append([1.0 if k // n == i else 0.0 for k in range(n * n)])
        rhs.append(a[i])
    for j in range(n):  # column sums = b
        A.append([1.0 if k % n == j else 0.0 for k in range(n * n)])
        rhs.append(b[j])
    res = linprog(cost, A_eq=A, b_eq=rhs, bounds=(0, None), method="highs")
    assert res.success
    return float(res.fun)


def ref_hamming(q: list[int], x: list[int]) -> int:
    return sum(bin(a ^ b).count("1") for a, b in zip(q, x, strict=True))


def ref_soft_min(values: list[float], tau: float) -> float:
    return -tau * math.log(sum(math.exp(-s / tau) for s in values) / len(values))


# --- embeddings -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,d", [(1, 1), (1, 5), (7, 3), (50, 64), (20, 500)])
@pytest.mark.parametrize(
    "fn,ref",
    [
        (sim.cosine_similarity, ref_cosine),
        (sim.euclidean_distance, ref_euclidean),
        (sim.manhattan_distance, ref_manhattan),
    ],
    ids=["cosine", "euclidean", "manhattan"],
)
def test_vector_measures_match_reference(fn, ref, seed, n, d):
    q, X = check_case(seed, n, d)
    got = fn(q, X)
    assert got.shape == (n,)
    assert got.dtype == np.float32
    expected = [ref(vec(q), x) for x in rows(X)]
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("fn", [sim.cosine_similarity, sim.euclidean_distance, sim.manhattan_distance])
def test_vector_measures_single_row_1d_x(fn):
    q, X = check_case(3, 1, 16)
    got = fn(q, X[0])
    assert got.shape == (1,)
    np.testing.assert_allclose(got, fn(q, X), rtol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_vector_measures_identical_and_symmetric(seed):
    q, X = check_case(seed, 10, 32)
    np.testing.assert_allclose(sim.cosine_similarity(q, q[None]), [1.0], atol=1e-6)
    np.testing.assert_allclose(sim.cosine_similarity(q, (3.5 * q)[None]), [1.0], atol=1e-6)  # scale-invariant
    np.testing.assert_allclose(sim.cosine_similarity(q, (-q)[None]), [-1.0], atol=1e-6)
    assert sim.euclidean_distance(q, q[None])[0] == 0.0
    assert sim.manhattan_distance(q, q[None])[0] == 0.0
    for fn in (sim.cosine_similarity, sim.euclidean_distance, sim.manhattan_distance):
        ab = fn(q, X)
        ba = np.array([fn(x, q[None])[0] for x in X])
        np.testing.assert_allclose(ab, ba, rtol=1e-5, atol=1e-6)


def test_cosine_zero_vector_is_zero_and_in_range():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(30, 8)).astype(np.float32)
    X[3] = 0.0
    with no_warnings():
        got = sim.cosine_similarity(np.zeros(8, np.float32), X)
        assert np.all(got == 0.0)
        got = sim.cosine_similarity(X[0], X)
    assert got[3] == 0.0
    assert np.all((got >= -1.0 - 1e-6) & (got <= 1.0 + 1e-6))


@pytest.mark.parametrize("seed", SEEDS)
def test_l2_normalize(seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(12, 9)) * rng.uniform(0.01, 100, size=(12, 1))
    X[4] = 0.0
    with no_warnings():
        Y = sim.l2_normalize(X)
    assert Y.dtype == np.float32 and Y.shape == X.shape
    for x, y in zip(rows(X), rows(Y), strict=True):
        norm = math.sqrt(sum(v * v for v in x))
        if norm == 0:
            assert all(v == 0.0 for v in y)
        else:
            np.testing.assert_allclose(y, [v / norm for v in x], rtol=1e-5, atol=1e-7)
    y1 = sim.l2_normalize(X[0])  # 1-D input
    assert y1.shape == (9,)
    np.testing.assert_allclose(np.linalg.norm(y1), 1.0, rtol=1e-6)


# --- histograms -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,d", [(1, 2), (9, 16), (40, 128)])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize(
    "fn,ref",
    [
        (sim.chi2_distance, ref_chi2),
        (sim.hellinger_distance, ref_hellinger),
        (sim.intersection_distance, ref_intersection),
    ],
    ids=["chi2", "hellinger", "intersection"],
)
def test_histogram_distances_match_reference(fn, ref, seed, n, d, sparse):
    rng = np.random.default_rng(seed)
    X = random_hists(rng, n, d, sparse)
    q = random_hists(rng, 1, d, sparse)[0]
    if n > 1:
        X[0] = q  # an identical row ...
        disjoint = np.where(q > 0, 0.0, X[1])  # ... and, where q has empty bins, one with no bin in common
        if disjoint.sum() > 0:
            X[1] = disjoint / disjoint.sum()
    with no_warnings():
        got = fn(q, X)
    assert got.shape == (n,) and got.dtype == np.float32
    expected = [ref(vec(q), x) for x in rows(X)]
    if fn is sim.hellinger_distance:
        # sqrt(1 - BC) loses precision near 0 in any floating point; away from 0 it must match, and near 0 the
        # stable ||sqrt(a) - sqrt(b)|| / sqrt(2) form (tested below) is the reference.
        far = np.array(expected) > 0.05
        np.testing.assert_allclose(got[far], np.array(expected)[far], rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.all((got >= 0.0) & (got <= 1.0))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_hellinger_equals_l2_between_sqrt_histograms(seed, sparse):
    """The property that makes an L2 index over sqrt-histograms exact for Hellinger: d_H = ||sqrt a - sqrt b||/sqrt 2."""
    rng = np.random.default_rng(seed)
    X = random_hists(rng, 30, 128, sparse)
    q = random_hists(rng, 1, 128, sparse)[0]
    X[0] = q
    X[1] = sim.normalize_histogram(q + rng.random(128).astype(np.float32) * 1e-4)  # a near duplicate
    with no_warnings():
        got = sim.hellinger_distance(q, X)
    expected = [ref_hellinger_l2(vec(q), x) for x in rows(X)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-6)
    l2 = np.linalg.norm(np.sqrt(X.astype(np.float64)) - np.sqrt(q.astype(np.float64)), axis=1) / np.sqrt(2)
    np.testing.assert_allclose(got, l2, rtol=1e-5, atol=2e-6)
    # the ranking an L2 index over sqrt-histograms produces is the Hellinger ranking
    assert list(np.argsort(l2, kind="stable")[:5]) == list(np.argsort(got.astype(np.float64), kind="stable")[:5])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("name", list(HIST_FUNCS))
def test_histogram_distance_identical_is_zero(name, seed, sparse):
    rng = np.random.default_rng(seed)
    X = random_hists(rng, 25, 128, sparse)
    fn = HIST_FUNCS[name]
    with no_warnings():
        got = np.array([fn(x, x[None])[0] for x in X])
    assert np.all(got >= 0.0)
    np.testing.assert_allclose(got, 0.0, atol=1e-6)


@pytest.mark.parametrize("name", list(HIST_FUNCS))
@pytest.mark.parametrize("seed", SEEDS)
def test_histogram_distance_symmetric_and_in_range(name, seed):
    rng = np.random.default_rng(seed)
    X = random_hists(rng, 20, 128, sparse=seed == 2)
    fn = HIST_FUNCS[name]
    D = np.stack([fn(x, X) for x in X])
    np.testing.assert_allclose(D, D.T, atol=1e-6)
    assert np.all((D >= 0.0) & (D <= 1.0))


def test_histogram_distances_maximal_for_disjoint_histograms():
    q = np.zeros(128, np.float32)
    x = np.zeros(128, np.float32)
    q[0] = 1.0  # hue 0, sat 0, value 0
    x[4 * 16 + 3 * 4 + 3] = 1.0  # hue 4 (opposite on the circle), sat 3, value 3
    for name, fn in HIST_FUNCS.items():
        np.testing.assert_allclose(fn(q, x[None]), [1.0], atol=1e-6, err_msg=name)


def test_zero_histograms_finite_in_range_without_warnings():
    rng = np.random.default_rng(11)
    X = random_hists(rng, 6, 128)
    X[2] = 0.0
    zero = np.zeros(128, np.float32)
    for name, fn in HIST_FUNCS.items():
        with no_warnings():
            both = fn(zero, zero[None])
            one_q = fn(zero, X)  # zero query vs normal rows (and one zero row)
            one_x = fn(X[0], X)  # normal query vs a zero row
        for got in (both, one_q, one_x):
            assert np.all(np.isfinite(got)), name
            assert np.all((got >= 0.0) & (got <= 1.0)), name


def test_chi2_zero_over_zero_bins_count_zero():
    q = np.array([0.5, 0.5, 0.0, 0.0], np.float32)
    x = np.array([0.5, 0.0, 0.5, 0.0], np.float32)  # bin 3 is 0/0
    with no_warnings():
        got = sim.chi2_distance(q, x[None])
    np.testing.assert_allclose(got, [ref_chi2(vec(q), vec(x))], rtol=1e-6)
    np.testing.assert_allclose(got, [0.5], rtol=1e-6)


@pytest.mark.parametrize("fn", list(HIST_FUNCS.values()), ids=list(HIST_FUNCS))
def test_histogram_distances_single_row_1d_x(fn):
    rng = np.random.default_rng(4)
    X = random_hists(rng, 2, 128)
    got = fn(X[0], X[1])
    assert got.shape == (1,)
    np.testing.assert_allclose(got, fn(X[0], X[1:2]), rtol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_normalize_histogram(seed):
    rng = np.random.default_rng(seed)
    H = rng.normal(size=(8, 20)) * 5
    H[3] = 0.0
    H[5] = -np.abs(H[5])  # all negative -> clipped to all zero
    with no_warnings():
        N = sim.normalize_histogram(H)
    assert N.dtype == np.float32 and N.shape == H.shape
    for h, nrow in zip(rows(H), rows(N), strict=True):
        clipped = [max(v, 0.0) for v in h]
        total = sum(clipped)
        expected = [v / total for v in clipped] if total > 0 else [0.0] * len(h)
        np.testing.assert_allclose(nrow, expected, rtol=1e-5, atol=1e-7)
    assert np.all(N >= 0)
    np.testing.assert_allclose(N[[0, 1, 2, 4, 6, 7]].sum(axis=1), 1.0, rtol=1e-6)
    assert np.all(N[[3, 5]] == 0)
    n1 = sim.normalize_histogram(np.array([1.0, 3.0]))  # 1-D
    np.testing.assert_allclose(n1, [0.25, 0.75])


# --- earth mover's distance -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS + (3, 4))
@pytest.mark.parametrize("n", [1, 5, 30])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_emd_matches_bruteforce_reference(seed, n, sparse):
    rng = np.random.default_rng(seed)
    X = random_hists(rng, n, 128, sparse)
    q = random_hists(rng, 1, 128, sparse)[0]
    with no_warnings():
        got = sim.emd_distance(q, X)
    assert got.shape == (n,) and got.dtype == np.float32
    expected = [ref_emd(vec(q), x) for x in rows(X)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.all((got >= 0.0) & (got <= 1.0))


@pytest.mark.parametrize("seed", SEEDS)
def test_emd_linear_channels_match_scipy(seed):
    """Hue by brute force, saturation and value by scipy.stats.wasserstein_distance."""
    rng = np.random.default_rng(seed)
    X = random_hists(rng, 15, 128, sparse=seed == 1)
    q = random_hists(rng, 1, 128)[0]
    got = sim.emd_distance(q, X)
    qh, qs, qv = marginals(vec(q))
    for g, x in zip(got, rows(X), strict=True):
        xh, xs, xv = marginals(x)
        ws = wasserstein_distance(range(4), range(4), xs, qs) / 3
        wv = wasserstein_distance(range(4), range(4), xv, qv) / 3
        # scipy renormalises the weights, whose float32-made sums are 1 only to ~1e-7
        assert ws == pytest.approx(ref_emd_linear(xs, qs), abs=1e-7)
        assert wv == pytest.approx(ref_emd_linear(xv, qv), abs=1e-7)
        assert float(g) == pytest.approx((ref_emd_circular(xh, qh) + ws + wv) / 3, rel=1e-5, abs=1e-6)


def product_hist(hue: list[float], sat: list[float], val: list[float]) -> np.ndarray:
    return np.einsum("i,j,k->ijk", hue, sat, val).reshape(-1).astype(np.float32)


@pytest.mark.parametrize("seed", SEEDS)
def test_emd_isolated_channels_match_linear_programming(seed):
    """Histograms that differ in one channel only: that channel's transport cost, solved as an LP, over 3."""
    rng = np.random.default_rng(seed)

    def p(k: int) -> list[float]:
        v = rng.random(k) * (rng.random(k) < 0.7) + 1e-3
        return list(v / v.sum())

    hue, sat, val = p(8), p(4), p(4)
    hue2, sat2, val2 = p(8), p(4), p(4)
    base = product_hist(hue, sat, val)
    cases = [
        (product_hist(hue2, sat, val), lp_emd(hue2, hue, circular=True) / 4),  # circular: max distance 8/2
        (product_hist(hue, sat2, val), lp_emd(sat2, sat, circular=False) / 3),
        (product_hist(hue, sat, val2), lp_emd(val2, val, circular=False) / 3),
    ]
    for x, channel_cost in cases:
        got = float(sim.emd_distance(base, x[None])[0])
        assert got == pytest.approx(channel_cost / 3, rel=1e-4, abs=1e-6)
        m = marginals(vec(x))
        b = marginals(vec(base))
        assert ref_emd_circular(m[0], b[0]) == pytest.approx(lp_emd(m[0], b[0], True) / 4, abs=1e-6)


def test_emd_hue_is_circular():
    """Moving all mass from hue bin 0 to hue bin 7 is one step around the circle, not seven."""
    hue_a, hue_b = [0.0] * 8, [0.0] * 8
    hue_a[0], hue_b[7] = 1.0, 1.0
    sat = val = [0.25] * 4
    got = float(sim.emd_distance(product_hist(hue_a, sat, val), product_hist(hue_b, sat, val)[None])[0])
    assert got == pytest.approx((1 / 4) / 3, abs=1e-6)
    hue_b = [0.0] * 8
    hue_b[4] = 1.0  # opposite: the largest circular distance
    got = float(sim.emd_distance(product_hist(hue_a, sat, val), product_hist(hue_b, sat, val)[None])[0])
    assert got == pytest.approx(1 / 3, abs=1e-6)


@pytest.mark.parametrize("bins", [(6, 3, 2), (5, 2, 3)])
def test_emd_other_bin_shapes(bins):
    rng = np.random.default_rng(21)
    d = bins[0] * bins[1] * bins[2]
    X = random_hists(rng, 10, d)
    q = random_hists(rng, 1, d)[0]
    got = sim.emd_distance(q, X, bins)
    expected = [ref_emd(vec(q), x, bins) for x in rows(X)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


# --- hashes -----------------------------------------------------------------------------------------------------------


def random_hashes(rng: np.random.Generator, n: int, w: int) -> np.ndarray:
    H = rng.integers(0, 2**64, size=(n, w), dtype=np.uint64, endpoint=False)
    H[::2] |= np.uint64(1 << 63)  # make sure the top bit is set on many words
    return H


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,w", [(1, 1), (1, 2), (17, 1), (40, 2), (5, 4)])
def test_hamming_matches_popcount_reference(seed, n, w):
    rng = np.random.default_rng(seed)
    X = random_hashes(rng, n, w)
    q = random_hashes(rng, 1, w)[0]
    q[0] |= np.uint64(1 << 63)
    got = sim.hamming_distance(q, X)
    assert got.shape == (n,) and got.dtype == np.int32
    expected = [ref_hamming([int(v) for v in q], [int(v) for v in x]) for x in X]
    assert got.tolist() == expected
    assert np.all((got >= 0) & (got <= 64 * w))


def test_hamming_extremes_and_top_bit():
    top = 1 << 63
    allones = 2**64 - 1
    X = np.array([[0], [top], [allones], [top | 1]], dtype=np.uint64)
    assert sim.hamming_distance(np.array([0], np.uint64), X).tolist() == [0, 1, 64, 2]
    assert sim.hamming_distance(np.array([allones], np.uint64), X).tolist() == [64, 63, 0, 62]
    # python ints above 2**63 work as the query
    assert sim.hamming_distance([top], X).tolist() == [1, 0, 63, 1]
    # two words: bits add up over the words
    X2 = np.array([[allones, 0], [top, top]], dtype=np.uint64)
    assert sim.hamming_distance(np.array([0, 0], np.uint64), X2).tolist() == [64, 2]


def test_hamming_identical_symmetric_and_1d():
    rng = np.random.default_rng(9)
    X = random_hashes(rng, 12, 2)
    assert np.all(np.array([sim.hamming_distance(x, x[None])[0] for x in X]) == 0)
    D = np.stack([sim.hamming_distance(x, X) for x in X])
    assert np.array_equal(D, D.T)
    single = X[:, 0]  # 1-D X: one single-word hash per row
    got = sim.hamming_distance(single[:1], single)
    assert got.tolist() == [ref_hamming([int(single[0])], [int(v)]) for v in single]


# --- scores, fusion, aggregation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(2, 1), (3, 10), (6, 25)])
@pytest.mark.parametrize("tau", [0.02, 0.05, 0.3, 2.0])
def test_soft_min_matches_reference(seed, shape, tau):
    rng = np.random.default_rng(seed)
    S = rng.random(shape)
    with no_warnings():
        got = sim.soft_min(S, tau)
    assert got.shape == (shape[1],) and got.dtype == np.float32
    expected = [ref_soft_min([float(S[i, j]) for i in range(shape[0])], tau) for j in range(shape[1])]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # between the minimum and the mean
    assert np.all(got >= S.min(axis=0) - 1e-6)
    assert np.all(got <= S.mean(axis=0) + 1e-6)
    # axis=1 is the transpose
    np.testing.assert_allclose(sim.soft_min(S.T, tau, axis=1), got, rtol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_soft_min_limits(seed):
    rng = np.random.default_rng(seed)
    S = rng.random((5, 40))
    with no_warnings():
        tiny = sim.soft_min(S, tau=1e-6)
        huge = sim.soft_min(S, tau=1e4)
        very_tiny = sim.soft_min(S, tau=1e-300)  # no overflow / underflow trouble
    np.testing.assert_allclose(tiny, S.min(axis=0), atol=1e-5)  # bounded by tau * log(k)
    np.testing.assert_allclose(very_tiny, S.min(axis=0), atol=1e-7)
    np.testing.assert_allclose(huge, S.mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(sim.soft_min(S, tau=0.0), S.min(axis=0), rtol=1e-7)
    np.testing.assert_allclose(sim.soft_min(S, tau=-1.0), S.min(axis=0), rtol=1e-7)


def test_soft_min_single_query_and_equal_scores():
    S = np.array([[0.1, 0.7, 0.3]])
    np.testing.assert_allclose(sim.soft_min(S, 0.05), [0.1, 0.7, 0.3], rtol=1e-7)
    E = np.full((4, 3), 0.6)
    np.testing.assert_allclose(sim.soft_min(E, 0.05), [0.6] * 3, rtol=1e-6)


def test_soft_min_prefers_all_round_match():
    # candidate 0 is good for both queries, candidate 1 excellent for one and poor for the other
    S = np.array([[0.8, 1.0], [0.8, 0.3]])
    got = sim.soft_min(S, 0.05)
    assert got[0] > got[1]


@pytest.mark.parametrize("seed", SEEDS)
def test_aggregate(seed):
    rng = np.random.default_rng(seed)
    S = rng.random((4, 12)).astype(np.float32)
    np.testing.assert_allclose(sim.aggregate(S, "min"), [min(S[:, j]) for j in range(12)], rtol=1e-7)
    np.testing.assert_allclose(sim.aggregate(S, "mean"), [sum(map(float, S[:, j])) / 4 for j in range(12)],
                               rtol=1e-6)
    for tau in (0.05, 0.5):
        np.testing.assert_allclose(sim.aggregate(S, "softmin", tau), sim.soft_min(S, tau), rtol=1e-7)
        np.testing.assert_allclose(
            sim.aggregate(S, "softmin", tau),
            [ref_soft_min([float(v) for v in S[:, j]], tau) for j in range(12)],
            rtol=1e-5,
        )
    np.testing.assert_allclose(sim.aggregate(S), sim.soft_min(S, 0.05), rtol=1e-7)  # default: softmin
    for how in ("min", "mean", "softmin"):
        out = sim.aggregate(S[:1], how)
        assert out.shape == (12,) and out.dtype == np.float32
        np.testing.assert_allclose(out, S[0], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown aggregation 'max'"):
        sim.aggregate(S, "max")


@pytest.mark.parametrize("seed", SEEDS)
def test_fuse(seed):
    rng = np.random.default_rng(seed)
    scores = {m: rng.random(15).astype(np.float32) for m in ("embedding", "color", "hash")}
    weights = {"embedding": 0.6, "color": 0.3, "hash": 0.1}
    got = sim.fuse(scores, weights)
    assert got.shape == (15,) and got.dtype == np.float32
    expected = [sum(weights[m] * float(scores[m][j]) for m in scores) / sum(weights.values()) for j in range(15)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # weights need not sum to 1
    np.testing.assert_allclose(sim.fuse(scores, {m: 10 * w for m, w in weights.items()}), got, rtol=1e-6)
    # zero / negative / missing weights and weights without a score are left out
    got2 = sim.fuse(scores, {"embedding": 2.0, "color": 0.0, "hash": -1.0, "other": 5.0})
    np.testing.assert_allclose(got2, scores["embedding"], rtol=1e-6)
    got3 = sim.fuse({"color": scores["color"]}, weights)
    np.testing.assert_allclose(got3, scores["color"], rtol=1e-6)
    # identical-image scores stay 1
    np.testing.assert_allclose(sim.fuse({m: np.ones(3) for m in scores}, weights), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="positive weight"):
        sim.fuse(scores, {"embedding": 0.0})
    with pytest.raises(ValueError, match="positive weight"):
        sim.fuse({}, weights)


@pytest.mark.parametrize("baseline", [-0.5, 0.0, 0.3, 0.62, 0.999, 1.0, 2.0])
def test_normalize_to_baseline(baseline):
    rng = np.random.default_rng(7)
    s = np.concatenate([rng.random(50), [0.0, 1.0]]).astype(np.float32)
    got = sim.normalize_to_baseline(s, baseline)
    assert got.dtype == np.float32 and got.shape == s.shape
    b = min(max(baseline, 0.0), 0.999)
    expected = [min(max((float(v) - b) / (1.0 - b), 0.0), 1.0) for v in s]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert np.all((got >= 0) & (got <= 1))
    # identical pair -> 1 (float32 rounding of the baseline is amplified by 1 / (1 - b))
    assert got[-1] == pytest.approx(1.0, abs=1e-7 / (1.0 - b) + 1e-7)
    assert got[-2] == 0.0
    if 0 < baseline < 1:
        assert float(sim.normalize_to_baseline(np.array([baseline]), baseline)[0]) == pytest.approx(0.0, abs=1e-6)


def ref_to_similarity(measure: str, distance: str, v: float, dim: int) -> float:
    if measure == "embedding":
        if distance == "cosine":
            s = v
        elif distance == "euclidean":
            s = 1.0 - v / 2.0
        else:
            s = 1.0 - v / (2.0 * math.sqrt(dim))
    elif measure == "hash":
        s = 1.0 - v / dim
    else:
        s = 1.0 - v
    return min(max(s, 0.0), 1.0)


@pytest.mark.parametrize(
    "measure,distance,dim,lo,hi",
    [
        ("embedding", "cosine", 64, -1.0, 1.0),
        ("embedding", "euclidean", 64, 0.0, 2.0),
        ("embedding", "manhattan", 64, 0.0, 16.0),
        ("hash", "phash", 64, 0, 64),
        ("hash", "both", 128, 0, 128),
        ("color", "hellinger", 1, 0.0, 1.0),
        ("color", "emd", 1, 0.0, 1.0),
    ],
)
def test_to_similarity(measure, distance, dim, lo, hi):
    rng = np.random.default_rng(3)
    v = rng.uniform(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo), 60)  # also a little out of range
    if measure == "hash":
        v = np.round(v)
    got = sim.to_similarity(measure, distance, v, dim=dim)
    assert got.dtype == np.float32 and got.shape == v.shape
    expected = [ref_to_similarity(measure, distance, float(x), dim) for x in v]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.all((got >= 0) & (got <= 1))
    best = 1.0 if distance == "cosine" else 0.0
    assert float(sim.to_similarity(measure, distance, np.array([best]), dim=dim)[0]) == 1.0
    worst = float(sim.to_similarity(measure, distance, np.array([lo if distance == "cosine" else hi]), dim=dim)[0])
    assert worst == 0.0


def test_to_similarity_on_real_distances():
    """End to end: unit embeddings / hashes / histograms -> similarities, identical rows score exactly 1."""
    rng = np.random.default_rng(8)
    E = sim.l2_normalize(rng.normal(size=(20, 32)))
    for name, fn in (("cosine", sim.cosine_similarity), ("euclidean", sim.euclidean_distance),
                     ("manhattan", sim.manhattan_distance)):
        s = sim.to_similarity("embedding", name, fn(E[0], E), dim=32)
        assert np.all((s >= 0) & (s <= 1))
        assert s[0] == pytest.approx(1.0, abs=1e-6)
    H = random_hists(rng, 20, 128)
    for name, fn in HIST_FUNCS.items():
        s = sim.to_similarity("color", name, fn(H[0], H))
        assert s[0] == pytest.approx(1.0, abs=1e-6), name
        assert np.all((s >= 0) & (s <= 1))
    Hs = random_hashes(rng, 20, 2)
    s = sim.to_similarity("hash", "both", sim.hamming_distance(Hs[0], Hs), dim=128)
    assert s[0] == 1.0 and np.all((s >= 0) & (s <= 1))


def test_histogram_distance_registry():
    assert set(sim.HISTOGRAM_DISTANCES) == {"hellinger", "chi2", "intersection", "emd"}
    for name, fn in sim.HISTOGRAM_DISTANCES.items():
        assert fn is HIST_FUNCS[name]


def test_penalize_pushes_down_what_resembles_a_negative():
    score = np.array([0.9, 0.8, 0.7], np.float32)
    neg = np.array([[0.95, 0.1, 0.2], [0.3, 0.2, 0.9]], np.float32)  # 2 negative images x 3 candidates
    out = sim.penalize(score, neg, weight=0.5)
    assert out == pytest.approx([0.9 - 0.475, 0.8 - 0.1, 0.7 - 0.45])
    assert int(np.argmax(out)) == 1  # the best match of the positives resembled a negative and lost its place
    assert sim.penalize(score, np.empty((0, 3)), 0.5) == pytest.approx(score)
    assert sim.penalize(score, neg, 0.0) == pytest.approx(score)


def test_ranks_within_counts_better_scores_and_shares_ties():
    s = np.array([0.5, 0.9, 0.1, 0.9, 0.7])
    assert sim.ranks_within(s, [1, 3, 4, 0, 2]).tolist() == [1, 1, 3, 4, 5]
    rng = np.random.default_rng(3)
    r = rng.random(200)
    ranks = sim.ranks_within(r, np.arange(200))
    assert sorted(ranks.tolist()) == list(range(1, 201))  # distinct scores: a permutation
    assert ranks[np.argmax(r)] == 1 and ranks[np.argmin(r)] == 200
    assert sim.ranks_within(np.empty(0), []).size == 0


def test_fit_whitening_decorrelates_and_orders_axes():
    rng = np.random.default_rng(0)
    scales = np.array([5.0, 3.0, 1.0, 0.5, 0.1])
    X = rng.normal(size=(4000, 5)) * scales @ np.linalg.qr(rng.normal(size=(5, 5)))[0] + 7.0
    mean, P = sim.fit_whitening(X, dims=3, power=0.5)
    assert mean.shape == (5,) and P.shape == (5, 3)
    for j in range(5):  # the mean, column by column with Python floats
        assert math.isclose(float(mean[j]), sum(float(x) for x in X[:, j]) / len(X), rel_tol=1e-4)
    Y = (X - mean) @ P
    C = np.cov(Y.T)  # full whitening: identity covariance on the kept axes
    assert np.allclose(C, np.eye(3), atol=0.03)
    basis = np.linalg.qr(P)[0]  # the kept axes span the 3 largest-variance directions: 25 + 9 + 1
    assert math.isclose(float(np.var((X - mean) @ basis, axis=0).sum()), 35.0, rel_tol=0.06)
    _, P25 = sim.fit_whitening(X, dims=5, power=0.25)  # a smaller power only damps: variance ratio 25^0.5 = 5
    v = np.var((X - mean) @ P25, axis=0)
    assert v[0] > v[-1] and math.isclose(v[0] / v[1], (25 / 9) ** 0.5, rel_tol=0.1)


def test_apply_whitening_projects_and_normalises():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 6))
    mean, P = sim.fit_whitening(X, dims=4)
    Y = sim.apply_whitening(X, mean, P)
    assert Y.shape == (300, 4) and Y.dtype == np.float32
    for i in (0, 7, 299):
        row = [sum((float(X[i, a]) - float(mean[a])) * float(P[a, b]) for a in range(6)) for b in range(4)]
        norm = math.sqrt(sum(v * v for v in row))
        assert np.allclose(Y[i], [v / norm for v in row], atol=1e-5)
    assert np.allclose(sim.apply_whitening(X[3], mean, P), Y[3], atol=1e-6)  # one vector as well as rows


def test_augment_weights_neighbours_linearly():
    rng = np.random.default_rng(2)
    X = sim.l2_normalize(rng.normal(size=(10, 4)))
    nn = np.array([[i, (i + 1) % 10, (i + 3) % 10] for i in range(10)])
    D = sim.augment(X, nn)
    for i in range(10):
        w = (1.0, 2 / 3, 1 / 3)
        row = [sum(w[j] * float(X[nn[i, j], d]) for j in range(3)) for d in range(4)]
        norm = math.sqrt(sum(v * v for v in row))
        assert np.allclose(D[i], [v / norm for v in row], atol=1e-5)
    assert np.allclose(sim.augment(X, np.arange(10).reshape(-1, 1)), X, atol=1e-6)  # k = 1: itself alone


def test_expand_query_adds_weighted_neighbours():
    q = np.array([1.0, 0.0, 0.0])
    nbrs = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    out = sim.expand_query(q, nbrs, np.array([0.5, 1.0, -0.2]), alpha=2.0)
    row = [1.0, 0.25, 1.0]  # 0.5**2, 1**2, a negative similarity counts 0
    norm = math.sqrt(sum(v * v for v in row))
    assert np.allclose(out, [v / norm for v in row], atol=1e-6)
    assert np.allclose(sim.expand_query(q, nbrs, np.zeros(3)), q)  # nothing similar: the query unchanged
    assert np.allclose(sim.expand_query(q, nbrs[:0], np.zeros(0)), q)


def test_every_public_function_is_tested():
    public = {n for n, v in vars(sim).items() if callable(v) and not n.startswith("_") and v.__module__ == sim.__name__}
    tested = {
        "l2_normalize", "cosine_similarity", "euclidean_distance", "manhattan_distance", "normalize_histogram",
        "chi2_distance", "hellinger_distance", "intersection_distance", "emd_distance", "hamming_distance",
        "to_similarity", "normalize_to_baseline", "fuse", "soft_min", "aggregate", "penalize", "ranks_within",
        "fit_whitening", "apply_whitening", "augment", "expand_query", "fuse_scores", "separation",
        "colour_agreement", "colour_gate",
    }
    assert public == tested



# --- fusion of the mix --------------------------------------------------------------------------------------------


def test_fuse_scores_weighted_is_the_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    S = {m: rng.random((2, 50)).astype(np.float32) for m in ("embedding", "color", "hash")}
    w = {"embedding": 0.85, "color": 0.1, "hash": 0.3}
    assert np.allclose(sim.fuse_scores(S, w, "weighted"), sim.fuse(S, w))
    with pytest.raises(ValueError, match="unknown fusion"):
        sim.fuse_scores(S, w, "borda")
    with pytest.raises(ValueError, match="positive weight"):
        sim.fuse_scores(S, {"embedding": 0.0}, "adaptive")


def test_separation_is_how_far_the_best_stand_out() -> None:
    flat = np.full((1, 200), 0.5, np.float32)
    peaked = flat.copy()
    peaked[0, :5] = 0.95
    assert sim.separation(flat)[0] == pytest.approx(0.0)
    assert sim.separation(peaked)[0] == pytest.approx(0.45, abs=1e-6)
    assert sim.separation(np.zeros((3, 1)))[0] == 0.0 and sim.separation(np.array([[0.9, 0.1]]))[0] > 0


def test_adaptive_fusion_trusts_the_measure_that_separates_for_this_query() -> None:
    n = 200
    rng = np.random.default_rng(1)
    emb = np.full((2, n), 0.3, np.float32) + 0.01 * rng.random((2, n), dtype=np.float32)
    col = emb.copy()
    emb[0, 0], col[0, 1] = 0.9, 0.35  # query 0: the embedding singles out image 0; colour barely prefers image 1
    emb[1, 0], col[1, 1] = 0.32, 0.95  # query 1: the other way round
    w = {"embedding": 0.5, "color": 0.5}
    fused = sim.fuse_scores({"embedding": emb, "color": col}, w, "adaptive")
    assert fused.shape == (2, n)
    assert np.argmax(fused[0]) == 0 and np.argmax(fused[1]) == 1
    one = sim.fuse_scores({"embedding": emb[0], "color": col[0]}, w, "adaptive")  # one row in, one row out
    assert one.shape == (n,) and np.allclose(one, fused[0])


def test_rrf_ranks_and_the_hash_keeps_copies_first() -> None:
    emb = np.array([[0.9, 0.8, 0.7, 0.6]], np.float32)
    col = np.array([[0.1, 0.9, 0.8, 0.2]], np.float32)
    hsh = np.array([[0.0, 0.0, 0.0, 1.0]], np.float32)  # image 3 is a near-duplicate (normalised hash > 0)
    w = {"embedding": 0.85, "color": 0.1, "hash": 0.3}
    for method in sim.FUSIONS:
        fused = sim.fuse_scores({"embedding": emb, "color": col, "hash": hsh}, w, method)
        assert np.argmax(fused[0]) == 3, method
    rrf = sim.fuse_scores({"embedding": emb, "color": emb}, {"embedding": 1.0, "color": 1.0}, "rrf")
    assert rrf[0, 0] == pytest.approx(1.0) and np.all(np.diff(rrf[0]) < 0)  # first under both scores 1


def test_colour_agreement_and_gate() -> None:
    same = np.full((4, 10), 0.6)
    assert sim.colour_agreement(same, same) == pytest.approx(1.0)
    assert sim.colour_agreement(0.5 * same, same) == pytest.approx(0.5)
    assert sim.colour_agreement(np.zeros((4, 10)), same) == 0.0
    assert sim.colour_agreement(np.empty((0, 10)), np.empty((0, 10))) == 0.0
    assert sim.colour_gate(0.1, 0.2) == 0.0 and sim.colour_gate(0.5, 0.2) == 1.0
    assert sim.colour_gate(0.225, 0.2) == pytest.approx(0.5)  # the ramp: 0.05 of agreement above the floor
