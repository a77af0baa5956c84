"""Leave-one-dataset-out: the mix's fusion chosen on the other labelled sets, reported on the held-out one.

For each labelled set, each query image (all of them, or a seeded random sample of ``limit``) is searched once by
the real engine with ``k`` = the whole set, which gives every image's score under every measure as the engine
computes it (query expansion included). The fusion candidates (``candidates()``: the weighted mean, query-adaptive
weights, reciprocal rank fusion, over a grid of colour weights) are then scored offline from those scores; the
single measures are ranked by their own scores. Per fold, the candidate picked on the other sets is the one whose
worst gap to the best single measure over those sets is largest (ties: the higher mean mAP); its held-out mAP is
compared with the held-out set's best single measure, per query, with a paired bootstrap interval.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from imgrec import measures
from imgrec import similarity as sim
from imgrec.measures import SINGLES

COLOR_WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
EMBEDDING_WEIGHT, HASH_WEIGHT = 0.85, 0.3
TIE = 1e-4  # mAP differences below this are ties (then the higher mean mAP wins)


@dataclass
class SetScores:
    """One labelled set searched query by query: every measure's similarity of every image to each query."""

    name: str
    labels: NDArray[np.int64]  # (n,) class per image (in index row order of the set's images)
    queries: NDArray[np.int64]  # (q,) positions of the query images in ``labels``
    scores: dict[str, NDArray[np.float32]]  # measure -> (q, n); the query itself at -inf
    baselines: dict[str, float]  # measure -> the level the mix normalises against (Engine.mix)
    agreement: float | None = None  # the index's colour-content agreement (the gated fusion's input)


@dataclass(frozen=True)
class Candidate:
    method: str  # a fusion of imgrec.similarity.FUSIONS, or "single"
    weights: tuple[tuple[str, float], ...]
    floor: float | None = None  # gated: Config.mix_gate_floor

    @property
    def name(self) -> str:
        if self.method == "single":
            return self.weights[0][0]
        w = dict(self.weights)
        floor = f" floor={self.floor:g}" if self.floor is not None else ""
        return f"{self.method} color={w.get('color', 0.0):g}{floor}"


GATE_FLOORS = (0.1, 0.15, 0.2, 0.3)


def candidates() -> list[Candidate]:
    """The fusions tried: each method over the colour weights (embedding and hash weights fixed); the gated one
    also over the floor of its gate."""
    out = []
    for method in sim.FUSIONS:
        for c in COLOR_WEIGHTS:
            if c == 0.0 and method != "weighted":
                continue  # the embedding's own ranking (plus copies): the weighted mean with colour 0 already
            w = (("embedding", EMBEDDING_WEIGHT), ("color", c), ("hash", HASH_WEIGHT))
            if method == "gated":
                out += [Candidate(method, w, floor) for floor in GATE_FLOORS]
            else:
                out.append(Candidate(method, w))
    return out


def collect(dataset: str | os.PathLike[str], *, label_by: str = "csv", limit: int | None = 1000, seed: int = 0,
            log: Callable[[str], None] = lambda s: None, progress: bool = False) -> SetScores:
    """Search every (sampled) image of a labelled set once; see the module docstring."""
    from tqdm.auto import tqdm

    from imgrec.evaluate import prepare

    engine, ls = prepare(dataset, log=log, progress=progress, label_by=label_by)
    ids = np.array(sorted(ls.ids), dtype=np.int64)
    labels = np.array([ls.ids[int(i)] for i in ids], dtype=np.int64)
    rng = np.random.default_rng(seed)
    queries = np.arange(ids.size) if not limit or limit >= ids.size else np.sort(
        rng.choice(ids.size, limit, replace=False))
    idx = engine.index
    base = {m: measure.baseline(idx) for m, measure in measures.singles(idx, engine.config).items()}
    agreement = idx.meta.get("color_agreement", {}).get("value")
    # the scores of one index and one query sample are searched once (a later run of other fusions reads them)
    cache = engine.lake.local_dir("reports") / f"lodo-scores-{idx.path.name}-{queries.size}-{seed}-{label_by}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            if np.array_equal(z["queries"], queries) and np.array_equal(z["labels"], labels):
                return SetScores(Path(dataset).name, labels, queries, {m: z[m] for m in SINGLES}, base, agreement)
    scores = {m: np.full((queries.size, ids.size), -np.inf, dtype=np.float32) for m in SINGLES}
    folders = [ls.folder] if ls.folder else None
    for qi, pos in enumerate(tqdm(queries, desc=Path(dataset).name, unit="query", disable=not progress)):
        resp = engine.search([int(ids[pos])], "mix", k=ids.size - 1, exclude_ids=[int(ids[pos])], folders=folders,
                             with_metadata=False, details=True)
        got = np.array([r.image_id for r in resp.results], dtype=np.int64)
        at = np.searchsorted(ids, got)
        for m in SINGLES:
            scores[m][qi, at] = np.array([r.scores[m] for r in resp.results], dtype=np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, queries=queries, labels=labels, **scores)
    os.replace(tmp, cache)
    return SetScores(Path(dataset).name, labels, queries, scores, base, agreement)


def average_precisions(S: NDArray[np.float32], labels: NDArray[np.int64], queries: NDArray[np.int64]
                       ) -> NDArray[np.float64]:
    """Per query row of ``S`` (the query itself at -inf): the average precision of ranking the set by it."""
    out = np.empty(len(queries))
    for s in range(0, len(queries), 256):
        block = S[s : s + 256]
        order = np.argsort(-block, axis=1, kind="stable")[:, :-1]  # the query itself last: left out
        rel = labels[order] == labels[queries[s : s + 256], None]
        hits = np.cumsum(rel, axis=1)
        prec = hits / np.arange(1, rel.shape[1] + 1)
        out[s : s + 256] = (prec * rel).sum(axis=1) / np.maximum(rel.sum(axis=1), 1)
    return out


def score(ss: SetScores, cand: Candidate) -> NDArray[np.float64]:
    """Per-query average precision of one candidate on one set."""
    if cand.method == "single":
        return average_precisions(ss.scores[cand.weights[0][0]], ss.labels, ss.queries)
    w = {m: v for m, v in cand.weights if v > 0}
    if cand.method == "gated" and "color" in w:
        gate = 1.0 if ss.agreement is None else sim.colour_gate(ss.agreement, cand.floor or 0.0)
        w = {m: v * gate if m == "color" else v for m, v in w.items()}
        w = {m: v for m, v in w.items() if v > 0}
    norm = {m: sim.normalize_to_baseline(np.where(np.isfinite(ss.scores[m]), ss.scores[m], 0.0), ss.baselines[m])
            for m in w}
    fused = np.asarray(sim.fuse_scores(norm, w, cand.method), dtype=np.float32)
    fused[~np.isfinite(ss.scores["embedding"])] = -np.inf
    return average_precisions(fused, ss.labels, ss.queries)


def bootstrap(diff: NDArray[np.float64], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of paired per-query differences (percentile bootstrap)."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, (n, diff.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def pick(aps: dict[str, dict[str, NDArray[np.float64]]], sets: Sequence[str], names: Sequence[str],
         caution: dict[str, float] | None = None) -> str:
    """The candidate whose worst gap to the best single measure over ``sets`` is largest; ties (within ``TIE``):
    the higher mean mAP, then the more cautious (``caution``: the gated fusion's floor, higher keeps colour out of
    more collections)."""
    def key(c: str) -> tuple[float, float, float]:
        gaps = [aps[s][c].mean() - max(aps[s][m].mean() for m in SINGLES) for s in sets]
        return (round(min(gaps) / TIE), round(float(np.mean([aps[s][c].mean() for s in sets])) / TIE),
                (caution or {}).get(c, 0.0))

    return max(names, key=key)


def protocol(sets: Sequence[SetScores], log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Every candidate on every set, then the folds, per fusion method and over all of them; the method whose
    held-out mix is never below the best single measure (95% interval of the paired difference reaching 0) and
    gains most on average is the default, with its parameters chosen on all sets. A JSON-ready report
    (``format_lodo``)."""
    cands = [Candidate("single", ((m, 1.0),)) for m in SINGLES] + candidates()
    names = [c.name for c in cands]
    aps: dict[str, dict[str, NDArray[np.float64]]] = {}
    for ss in sets:
        t = time.perf_counter()
        aps[ss.name] = {c.name: score(ss, c) for c in cands}
        log(f"imgrec: {ss.name}: {len(cands)} candidates scored in {time.perf_counter() - t:.1f}s")
    caution = {c.name: c.floor for c in cands if c.floor is not None}
    families = {"any": [c.name for c in cands if c.method != "single"]}
    for method in sim.FUSIONS:
        families[method] = [c.name for c in cands if c.method == method or (c.method == "weighted"
                                                                             and c.name == "weighted color=0")]
    folds = []
    for family, members in families.items():
        for held in sets:
            others = [s.name for s in sets if s.name != held.name]
            chosen = pick(aps, others, members, caution)
            a = aps[held.name]
            best = max(SINGLES, key=lambda m: a[m].mean())
            diff = a[chosen] - a[best]
            lo, hi = bootstrap(diff)
            folds.append({"family": family, "held_out": held.name, "chosen_on": others, "chosen": chosen,
                          "map": float(a[chosen].mean()), "best_single": best, "best_single_map": float(a[best].mean()),
                          "diff": float(diff.mean()), "ci95": [lo, hi], "queries": int(diff.size),
                          "singles": {m: float(a[m].mean()) for m in SINGLES}})
    safe = {f: float(np.mean([x["diff"] for x in folds if x["family"] == f])) for f in sim.FUSIONS
            if all(x["ci95"][1] >= 0 for x in folds if x["family"] == f)}
    method = max(safe, key=lambda f: safe[f]) if safe else "weighted"
    final = pick(aps, [s.name for s in sets], families[method], caution)
    return {"sets": [s.name for s in sets], "queries": {s.name: int(s.queries.size) for s in sets},
            "agreement": {s.name: s.agreement for s in sets},
            "table": {s: {c: float(v.mean()) for c, v in aps[s].items()} for s in aps}, "folds": folds,
            "never_worse": safe, "method": method, "final": final, "candidates": names}


def format_lodo(report: dict[str, Any]) -> str:
    """The held-out table and every candidate's mAP per set, as Markdown."""
    lines = ["| method | held out | chosen on the others | mix mAP | best single | its mAP | mix - best (95% CI) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for f in report["folds"]:
        lo, hi = f["ci95"]
        lines.append(f"| {f['family']} | {f['held_out']} | {f['chosen']} | {f['map']:.4f} | "
                     f"{f['best_single']} | {f['best_single_map']:.4f} | {f['diff']:+.4f} ({lo:+.4f}, {hi:+.4f}) |")
    agree = ", ".join(f"{s} {a:.3f}" if a is not None else f"{s} -" for s, a in report.get("agreement", {}).items())
    lines += ["", f"never below the best single measure held-out: {', '.join(report['never_worse']) or 'none'}; "
              f"default: {report['method']}, chosen on all sets: {report['final']}",
              f"colour-content agreement of each set's index: {agree}", "",
              "| candidate | " + " | ".join(report["sets"]) + " |", "| --- |" + " --- |" * len(report["sets"])]
    for c in report["candidates"]:
        lines.append(f"| {c} | " + " | ".join(f"{report['table'][s][c]:.4f}" for s in report["sets"]) + " |")
    return "\n".join(lines)


def run(datasets: Sequence[tuple[str, str]], *, limit: int | None = 1000, seed: int = 0,
        log: Callable[[str], None] = lambda s: None, progress: bool = False) -> dict[str, Any]:
    """The protocol over ``(folder, label_by)`` pairs (at least two sets)."""
    from imgrec.evaluate import EvalError

    if len(datasets) < 2:
        raise EvalError("leave-one-dataset-out needs at least two labelled sets")
    t0 = time.perf_counter()
    sets = []
    for folder, label_by in datasets:
        log(f"imgrec: {Path(folder).name}: searching each query image ...")
        sets.append(collect(folder, label_by=label_by, limit=limit, seed=seed, log=log, progress=progress))
    report = protocol(sets, log=log)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report
