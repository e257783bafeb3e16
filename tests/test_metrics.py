"""IR metrics: gmr_fast.evaluation against pytrec_eval and against values worked out by hand
(ties broken as trec_eval does: by docid, descending)."""

import math

import numpy as np
import pytest

pytrec_eval = pytest.importorskip("pytrec_eval")

from gmr_fast.evaluation import MetricError, build_report, evaluate, parse_metrics  # noqa: E402
from gmr_fast.suite import trec_order  # noqa: E402


def dcg(gains):
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def test_hand_made_run_with_ties():
    qrels = {"q1": {"a": 2, "b": 0, "c": 1, "z": 1}, "q2": {"x": 1}}
    # q1: a and b tie at 0.5; trec_eval ranks b before a (docid descending), ignoring file order
    run = {"q1": {"a": 0.5, "b": 0.5, "c": 0.9, "d": 0.1}, "q2": {"y": 3.0, "x": 3.0, "w": 1.0}}
    means, per_query = evaluate(qrels, run, ["ndcg_cut_10", "recip_rank", "recall_100", "map", "P_2"])
    assert [d for d, _ in trec_order(run["q1"])] == ["c", "b", "a", "d"]
    assert [d for d, _ in trec_order(run["q2"])] == ["y", "x", "w"]

    # q1 ranking c, b, a, d; judged gains 1, 0, 2, 0; ideal 2, 1, 1 (z is relevant but never retrieved)
    ndcg_q1 = dcg([1, 0, 2, 0]) / dcg([2, 1, 1])
    ndcg_q2 = dcg([0, 1]) / dcg([1])
    assert per_query["q1"]["ndcg_cut_10"] == pytest.approx(ndcg_q1, abs=1e-12)
    assert per_query["q2"]["ndcg_cut_10"] == pytest.approx(ndcg_q2, abs=1e-12)
    assert per_query["q1"]["recip_rank"] == 1.0 and per_query["q2"]["recip_rank"] == 0.5
    assert per_query["q1"]["recall_100"] == pytest.approx(2 / 3) and per_query["q2"]["recall_100"] == 1.0
    # AP q1: relevant at ranks 1 (c) and 3 (a) of 3 relevant: (1/1 + 2/3) / 3
    assert per_query["q1"]["map"] == pytest.approx((1 + 2 / 3) / 3)
    assert per_query["q1"]["P_2"] == 0.5
    assert means["ndcg_cut_10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2)
    assert means["recip_rank"] == pytest.approx(0.75)

    direct = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recip_rank", "recall.100", "map", "P.2"}).evaluate(run)
    assert per_query == direct


def test_random_runs_equal_pytrec_eval(rng):
    qrels, run = {}, {}
    for q in range(30):
        docs = [f"d{j}" for j in rng.permutation(60)[:40]]
        qrels[f"q{q}"] = {d: int(rng.integers(0, 3)) for d in docs[:8]}
        scores = rng.integers(0, 10, size=40).astype(float)  # many ties on purpose
        run[f"q{q}"] = dict(zip(docs, scores))
    metrics = parse_metrics("recip_rank,map,recall_100,P_5")
    means, per_query = evaluate(qrels, run, metrics)
    measures = {"ndcg_cut.10", "recip_rank", "map", "recall.100", "P.5"}
    direct = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    assert per_query == direct
    for m in metrics:
        assert means[m] == pytest.approx(np.mean([v[m] for v in direct.values()]), abs=1e-12)


def test_metric_names():
    assert parse_metrics("map,recip_rank") == ["ndcg_cut_10", "map", "recip_rank"]
    with pytest.raises(MetricError, match="unknown metric 'ndcg@10'"):
        parse_metrics("ndcg@10")


def test_report_groups_by_task_and_category():
    def entry(task, cat, v):
        return {"task": task, "category": cat, "first_stage": {"ndcg_cut_10": v / 2}, "reranked": {"ndcg_cut_10": v}}

    report = build_report({"a": entry("t2t", "single-modal", 0.2), "b": entry("t2t", "single-modal", 0.4),
                           "c": entry("t2i", "cross-modal", 0.9)}, ["ndcg_cut_10"])
    assert report["tasks"]["t2t"]["reranked"]["ndcg_cut_10"] == pytest.approx(0.3)
    assert report["categories"]["cross-modal"]["datasets"] == ["c"]
    assert report["mrb_average"]["reranked"] == pytest.approx(0.5)  # per dataset, not per task
    assert report["mrb_average"]["first_stage"] == pytest.approx(0.25)
