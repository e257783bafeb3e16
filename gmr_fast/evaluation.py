"""IR metrics through pytrec_eval (trec_eval itself), and the MRB report built from them.

No metric is computed here: per-query values and their means both come from pytrec_eval
(``RelevanceEvaluator`` and ``compute_aggregated_measure``), so the numbers are trec_eval's,
ties broken by docid as trec_eval does. This module only names measures and averages
per-dataset means over tasks, categories and the whole suite (the MRB average is the mean of
per-dataset nDCG@10).
"""

from __future__ import annotations

import re
import statistics

from .errors import GmrError

DEFAULT_METRICS = ("ndcg_cut_10", "recip_rank", "recall_100", "map")
HEADLINE = "ndcg_cut_10"


class MetricError(GmrError, ValueError):
    pass


def _pytrec_eval():
    try:
        import pytrec_eval
    except ImportError:
        raise MetricError("metrics need pytrec_eval: pip install pytrec-eval-terrier") from None
    return pytrec_eval


def parse_metrics(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Metric names as trec_eval reports them (``ndcg_cut_10``, ``recip_rank``, ``recall_100``,
    ``P_5``, ``map``); nDCG@10 is always included because the report ranks by it."""
    names = [m.strip() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    supported = _pytrec_eval().supported_measures
    for name in names:
        _measure(name, supported)
    return list(dict.fromkeys([HEADLINE, *names]))


def _measure(name: str, supported) -> str:
    """``ndcg_cut_10`` -> ``ndcg_cut.10`` (pytrec_eval's request syntax)."""
    if name in supported:
        return name
    m = re.fullmatch(r"(.+)_(\d+)", name)
    if m and m.group(1) in supported:
        return f"{m.group(1)}.{m.group(2)}"
    raise MetricError(f"unknown metric {name!r}: use trec_eval names such as ndcg_cut_10, recip_rank, recall_100, "
                      f"map, P_5")


def evaluate(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], metrics: list[str]
             ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(mean over queries, per-query values) for ``metrics``. Queries are those in both the run
    and the qrels, as trec_eval evaluates them."""
    pe = _pytrec_eval()
    supported = pe.supported_measures
    evaluator = pe.RelevanceEvaluator(qrels, {_measure(m, supported) for m in metrics})
    per_query = evaluator.evaluate(run)
    means = {}
    for m in metrics:
        values = [v[m] for v in per_query.values()]
        means[m] = float(pe.compute_aggregated_measure(m, values)) if values else float("nan")
    return means, per_query


def _mean(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.fmean(values) if values else float("nan")


def build_report(datasets: dict[str, dict], metrics: list[str], unreadable: dict[str, str] | None = None) -> dict:
    """``datasets``: name -> {"task", "category", "first_stage": {m: v}, "reranked": {m: v}, ...}.
    Adds per-task and per-category means of per-dataset values and the MRB average; ``unreadable``
    (name -> error) lists the suite's datasets that could not be read, which no mean includes."""
    def group(key: str) -> dict:
        out: dict[str, dict] = {}
        for name, d in datasets.items():
            out.setdefault(d[key], {"datasets": []})["datasets"].append(name)
        for g in out.values():
            for run in ("first_stage", "reranked"):
                g[run] = {m: _mean([datasets[n][run][m] for n in g["datasets"]]) for m in metrics}
        return dict(sorted(out.items()))

    return {
        "metrics": metrics,
        "datasets": datasets,
        "tasks": group("task"),
        "categories": group("category"),
        "mrb_average": {
            "metric": HEADLINE,
            "datasets": len(datasets),
            "first_stage": _mean([d["first_stage"][HEADLINE] for d in datasets.values()]),
            "reranked": _mean([d["reranked"][HEADLINE] for d in datasets.values()]),
            "unreadable": len(unreadable or {}),
        },
        "unreadable": dict(unreadable or {}),
    }


def _pct(v: float) -> str:
    return "n/a" if v != v else f"{100 * v:.2f}"


def report_markdown(report: dict) -> str:
    """The report as Markdown tables (values x 100, as MRB papers print them)."""
    metrics = report["metrics"]
    head = " | ".join(f"{m} first / reranked" for m in metrics)
    lines = ["# gmr_fast MRB report", "",
             f"MRB average ({report['mrb_average']['metric']}, mean over {report['mrb_average']['datasets']} datasets): "
             f"first stage **{_pct(report['mrb_average']['first_stage'])}**, reranked "
             f"**{_pct(report['mrb_average']['reranked'])}**", ""]
    unreadable = report.get("unreadable", {})
    if unreadable:
        lines += [f"**{len(unreadable)} dataset(s) could not be read and are in no mean above or below:**", ""]
        lines += [f"- {name}: {message}" for name, message in unreadable.items()] + [""]
    lines += ["## Datasets", "",
              f"| dataset | task | queries | pairs | failed | malformed rows | truncated | {head} |",
              "|---|---|---|---|---|---|---|" + "---|" * len(metrics)]
    for name, d in report["datasets"].items():
        cells = " | ".join(f"{_pct(d['first_stage'][m])} / {_pct(d['reranked'][m])}" for m in metrics)
        lines.append(f"| {name} | {d['task']} | {d['queries']} | {d['pairs']} | {d['failed']} | "
                     f"{d.get('malformed_rows', 0)} | {d['truncated']} | {cells} |")
    for title, key, label in (("Tasks", "tasks", "task"), ("Categories", "categories", "category")):
        lines += ["", f"## {title}", "", f"| {label} | datasets | {head} |", "|---|---|" + "---|" * len(metrics)]
        for name, g in report[key].items():
            cells = " | ".join(f"{_pct(g['first_stage'][m])} / {_pct(g['reranked'][m])}" for m in metrics)
            lines.append(f"| {name} | {len(g['datasets'])} | {cells} |")
    return "\n".join(lines) + "\n"
