"""Record what the engine answers to a fixed set of searches and joins over one lake, as JSON.

Run by ``tests/test_equivalence.py`` with this checkout's code and with an earlier commit's (its ``imgrec`` first on
``sys.path``), so a restructuring proves it kept every result and score. Only the engine's public API is used, in
the form both versions have: ``python search_record.py LAKE UPLOADS_DIR OUT.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DISTANCES = {
    "color": ("layout", "hellinger", "chi2", "intersection", "emd"),
    "hash": ("phash+dhash", "phash", "dhash"),
    "embedding": ("cosine", "euclidean", "manhattan"),
    "mix": (None,),
}


def _result(r: Any) -> dict[str, Any]:
    return {"id": r.image_id, "score": r.score, "scores": r.scores, "ranks": r.ranks,
            "contributions": r.contributions, "path": r.path}


def cases(ids: list[int], uploads: list[Path], folder: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, search keyword arguments): every measure and distance with 1 and 5 images, uploads, filters,
    negatives, range queries and the other options."""
    out: list[tuple[str, dict[str, Any]]] = []
    up = [p.read_bytes() for p in uploads]
    for measure, dists in DISTANCES.items():
        for d in dists:
            tag = f"{measure}/{d}"
            out += [
                (f"{tag} 1 id", {"queries": [ids[0]], "measure": measure, "distance": d, "k": 10}),
                (f"{tag} 5 ids", {"queries": ids[1:6], "measure": measure, "distance": d, "k": 10}),
                (f"{tag} upload", {"queries": [up[0]], "measure": measure, "distance": d, "k": 10}),
                (f"{tag} 2 uploads + id", {"queries": [up[1], up[2], ids[7]], "measure": measure, "distance": d,
                                           "k": 10}),
                (f"{tag} negative", {"queries": [ids[8]], "negatives": [ids[9]], "measure": measure, "distance": d,
                                     "k": 10}),
                (f"{tag} folder", {"queries": [ids[10]], "folders": [folder], "measure": measure, "distance": d,
                                   "k": 10}),
                (f"{tag} exclude", {"queries": [ids[11], ids[12]], "exclude_query": True, "measure": measure,
                                    "distance": d, "k": 10}),
            ]
    for measure, threshold in (("mix", 0.3), ("color", 0.8), ("embedding", 0.6), ("hash", 0.7)):
        out.append((f"{measure} range {threshold}", {"queries": [ids[13]], "measure": measure,
                                                     "threshold": threshold}))
    for aggregate in ("mean", "min"):
        out.append((f"mix aggregate {aggregate}", {"queries": ids[14:17], "measure": "mix", "aggregate": aggregate,
                                                   "k": 10}))
    out += [
        ("mix no expansion", {"queries": [ids[17], up[3]], "measure": "mix", "expand": False, "k": 10}),
        ("embedding no expansion", {"queries": [ids[18]], "measure": "embedding", "expand": False, "k": 10}),
        ("color no expansion", {"queries": [ids[18]], "measure": "color", "expand": False, "k": 10}),
        ("mix weights", {"queries": [ids[19]], "measure": "mix", "k": 10,
                         "weights": {"embedding": 0.5, "color": 0.5, "hash": 0.0}}),
        ("mix colour alone", {"queries": [ids[19]], "measure": "mix", "k": 10, "weights": {"color": 1.0}}),
        ("mix details off", {"queries": [ids[20]], "measure": "mix", "k": 10, "details": False}),
        ("color details off upload", {"queries": [up[4]], "measure": "color", "k": 10, "details": False}),
        ("mix negatives uploads", {"queries": [up[0], ids[21]], "negatives": [up[4]], "measure": "mix", "k": 10,
                                   "negative_weight": 0.8}),
    ]
    return out


def record(lake: str, uploads_dir: str) -> dict[str, Any]:
    from imgrec import join as join_module
    from imgrec.config import Config
    from imgrec.search import Engine

    uploads = sorted(Path(uploads_dir).glob("*.jpg"))
    engine = Engine(Config.load(lake), auto_index=False)
    ids = [int(i) for i in engine.index.ids[:: max(1, engine.size // 24)][:24]]
    folder = engine.cursor().execute("SELECT folder FROM images GROUP BY folder ORDER BY count(*) DESC, folder "
                                     "LIMIT 1").fetchone()[0]
    out: dict[str, Any] = {"ids": ids, "searches": {}, "joins": {}}
    engines = {"": engine, " (filters through candidates)": Engine(Config.load(lake, exact_filter_limit=10),
                                                                    auto_index=False)}
    for suffix, eng in engines.items():
        for name, kw in cases(ids, uploads, folder):
            if suffix and "folders" not in kw:
                continue
            queries = kw.pop("queries")
            resp = eng.search(queries, **kw)
            out["searches"][name + suffix] = {"results": [_result(r) for r in resp.results],
                                             "candidates": resp.candidates, "distance": resp.distance}
    collections = [r[0] for r in engine.cursor().execute("SELECT collection FROM collections ORDER BY 1").fetchall()]
    joins = [(m, "all", "all", {"k": 3}) for m in ("embedding", "color", "hash", "mix")]
    joins += [("hash", "all", "all", {"threshold": 0.9}), ("mix", "all", "all", {"threshold": 0.55}),
              ("mix", collections[0], collections[-1], {"k": 2}), ("embedding", collections[-1], "all", {"k": 4})]
    for exact_right in (join_module.EXACT_RIGHT, 50):  # exact scoring, then through the graphs
        join_module.EXACT_RIGHT = exact_right
        for measure, left, right, kw in joins:
            fn = getattr(engine, "join", None)
            table = fn(left, right, measure, **kw) if fn is not None else join_module.join(
                engine, left, right, measure, **kw)
            cols = ["left_id", "right_id", "score", "score_embedding", "score_color", "score_hash", "rank"]
            out["joins"][f"{measure} {left} {right} {kw} exact_right={exact_right}"] = {
                c: table.column(c).to_pylist() for c in cols}
    return out


if __name__ == "__main__":
    Path(sys.argv[3]).write_text(json.dumps(record(sys.argv[1], sys.argv[2])))
