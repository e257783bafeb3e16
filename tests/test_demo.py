"""The bundled demo's chain, reduced: generate MRB-mini, train a few steps from random weights,
export (with its parity validation), score the test split with the CLI, read the report."""

import json
import os

import pytest

pytestmark = pytest.mark.e2e

pytest.importorskip("torch")
pytest.importorskip("pytrec_eval")


def test_mrb_mini_is_valid_suite_data(tmp_path):
    from gmr_fast.suite import find_datasets, load_dataset
    from train.data import load_groups
    from train.mrb_mini import generate

    paths = generate(str(tmp_path), seed=3, test_queries=5, train_groups=8, negatives=3)
    datasets = [load_dataset(d) for d in find_datasets(paths["test"])]
    assert sorted(d.task for d in datasets) == ["i2t", "it2it", "t2i", "t2t"]
    for ds in datasets:
        for qid in ds.query_order():
            cands = [d for d, _ in ds.candidates[qid]]
            assert len(cands) == 20 == len(set(cands))
            grades = sorted(ds.qrels[qid].values())
            assert grades == [1, 1, 1, 1, 2, 2] and set(ds.qrels[qid]) <= set(cands)
    groups = load_groups(paths["train"])
    assert len(groups) == 8 and all(len(g.negatives) == 3 for g in groups)


def test_quick_demo_chain(tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from train.demo import run

    summary = run(str(tmp_path / "demo"), quick=True)
    report = json.load(open(tmp_path / "demo" / "scores" / "report.json"))
    assert sorted(report["tasks"]) == ["i2t", "it2it", "t2i", "t2t"]
    assert all(d["scored"] == d["pairs"] == 4 * 20 and d["failed"] == 0 for d in report["datasets"].values())
    assert summary["reranked_ndcg10"] == report["mrb_average"]["reranked"]
    gmr = json.load(open(tmp_path / "demo" / "gmr-mini" / "gmr.json"))
    assert gmr["training"]["objective"] == "sft" and gmr["training"]["mode"] == "full"
    manifest = json.load(open(tmp_path / "demo" / "engine" / "manifest.json"))
    assert manifest["variants"]["fp32"]["validation"]["max_rel_error"] <= 1e-3
