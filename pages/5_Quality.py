"""Quality: how good each measure's results are, from the evaluation reports saved in the lake (`imgrec eval`)."""

from __future__ import annotations

from typing import Any

import streamlit as st

from imgrec import ui
from imgrec.evaluate import load_reports

MEASURE_ORDER = ("embedding", "color", "hash", "mix")


def _ordered(measures: dict[str, Any]) -> list[str]:
    return sorted(measures, key=lambda m: (MEASURE_ORDER.index(m) if m in MEASURE_ORDER else 9, m))


def _single_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for m in _ordered(report["measures"]):
        r = report["measures"][m]
        rows.append({"measure": m, "mAP": r["map"], "P@5": r["p@5"], "P@10": r["p@10"], "P@20": r["p@20"],
                     "R@100": r["r@100"], "queries": r["queries"], "ms per whole-set ranking": r["query_ms"]})
    return rows


def _pr_chart(report: dict[str, Any]) -> Any:
    import altair as alt

    points = [{"measure": m, "recall": x, "precision": y}
              for m in _ordered(report["measures"]) for x, y in report["measures"][m].get("pr_curve", [])]
    colors = [ui.MEASURE_COLORS.get(m, "#b279a2") for m in _ordered(report["measures"])]
    return (alt.Chart(alt.Data(values=points)).mark_line(point=True)
            .encode(x=alt.X("recall:Q", scale=alt.Scale(domain=[0, 1])),
                    y=alt.Y("precision:Q", scale=alt.Scale(domain=[0, 1]), title="precision (interpolated)"),
                    color=alt.Color("measure:N", scale=alt.Scale(domain=_ordered(report["measures"]), range=colors)),
                    tooltip=["measure:N", "recall:Q", "precision:Q"])
            .properties(height=320))


def _multi_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for m in _ordered(report.get("multi", {})):
        per = report["multi"][m]
        row: dict[str, Any] = {"measure": m, "1 image": report["measures"].get(m, {}).get("p@5")}
        for size in ("2", "3", "5"):
            row[f"{size} images"] = per.get(size, {}).get("p@5")
        row["2 classes mixed"] = per.get("mixed", {}).get("p@5")
        rows.append(row)
    return rows


def _near_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    near = report.get("near_duplicates", {})
    return [{"measure": m, **near[m]} for m in _ordered(near)]


def show(report: dict[str, Any]) -> None:
    st.subheader(f"{report['name']}: {report['images']:,} images, {report['classes']} classes")
    st.caption(f"model {report.get('model')}, colour bins {report.get('color_bins')}, mix weights "
               f"{report.get('weights')}, several images: {report.get('aggregate')}; evaluated in "
               f"{report.get('seconds')} s on snapshot {report.get('snapshot')} of `{report.get('lake')}`")
    st.markdown("**Every image a query** (itself excluded; relevant: same class)")
    st.dataframe(_single_table(report), hide_index=True, width="stretch")
    st.altair_chart(_pr_chart(report), width="stretch")
    if report.get("multi"):
        st.markdown("**Several query images** (P@5; sets of one class, or one image of each of two classes)")
        st.dataframe(_multi_table(report), hide_index=True, width="stretch")
    if report.get("near_duplicates"):
        st.markdown("**Near-duplicates**: how often a transformed copy finds its original first (recall@1)")
        st.dataframe(_near_table(report), hide_index=True, width="stretch")


status = ui.page_start("Quality", ":material/fact_check:", need_images=False)
st.caption("What each measure is good at, measured on labelled sets: mAP and precision of the first results, "
           "several query images, and copies (resized, re-encoded, cropped, brightened, rotated, mirrored, grey). "
           "See docs/relevance.md for the method.")
reports = load_reports(status.path)
if not reports:
    st.info(f"No evaluation report in `{status.path}` yet. Evaluate a labelled set (a folder with labels.csv: "
            f"columns path, class_id) with\n\n```\nimgrec eval DATASET_DIR --lake {status.path}\n```\n\nor without "
            "`--lake` into a lake of its own, then point the sidebar at that lake.")
    st.stop()
tabs = st.tabs([r["name"] for r in reports])
for tab, report in zip(tabs, reports, strict=True):
    with tab:
        try:
            show(report)
        except (KeyError, TypeError, ValueError) as exc:  # a report from another version of imgrec
            st.error(f"The report {report.get('name')} cannot be shown ({exc}); run `imgrec eval` again.")
