"""End-to-end tests of ``python -m gmr_fast.score`` on a tiny exported engine: outputs, report
averages recomputed independently, resume after SIGKILL, per-item failures, malformed input."""

import json
import os
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest
from suite_helpers import mixed_dataset, save_image, write_dataset

pytestmark = pytest.mark.e2e
pytrec_eval = pytest.importorskip("pytrec_eval")

from gmr_fast import Reranker  # noqa: E402
from gmr_fast.score import main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def engine(exported_engines):
    return str(exported_engines["qwen2_5_vl"][1])


def run_cli(*args, capsys=None):
    code = main([str(a) for a in args] + ["--quiet"])
    err = capsys.readouterr().err if capsys else ""
    return code, err


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_trec(path):
    run = {}
    with open(path) as f:
        for line in f:
            q, _, d, _, s, _ = line.split()
            run.setdefault(q, {})[d] = float(s)
    return run


def test_suite_outputs_and_report(engine, tmp_path):
    suite = tmp_path / "suite"
    mixed_dataset(str(suite), "alpha", seed=1)
    mixed_dataset(str(suite), "beta", seed=2)
    path = mixed_dataset(str(suite), "gamma", seed=3)
    meta = json.load(open(os.path.join(path, "dataset.json")))
    json.dump({**meta, "task": "t2i"}, open(os.path.join(path, "dataset.json"), "w"))
    out = tmp_path / "out"
    code, _ = run_cli("--engine", engine, "--data", suite, "--out", out, "--top-k", 7)
    assert code == 0

    report = json.load(open(out / "report.json"))
    reranker = Reranker(engine)
    per_dataset = {}
    for name in ("alpha", "beta", "gamma"):
        scores = read_jsonl(out / name / "scores.jsonl")
        assert len(scores) == 6 * 7 and not read_jsonl(out / name / "errors.jsonl")
        assert {r["first_stage_rank"] for r in scores} == set(range(1, 8))
        # the scores are the library's scores for the same pairs
        queries = {r["id"]: r for r in map(json.loads, open(suite / name / "queries.jsonl"))}
        corpus = {r["id"]: r for r in map(json.loads, open(suite / name / "corpus.jsonl"))}

        def side(rec, base=suite / name):
            return {k: (str(base / v) if k == "image" else v) for k, v in rec.items() if k in ("text", "image")}

        lib = reranker.score([(side(queries[r["qid"]]), side(corpus[r["docid"]])) for r in scores],
                             instruction="Given a query, find relevant documents.")
        np.testing.assert_allclose([r["score"] for r in scores], lib, atol=1e-5)

        # run.trec: ranks follow trec_eval's order, scores are the journal's
        run = read_trec(out / name / "run.trec")
        assert {(q, d): s for q, docs in run.items() for d, s in docs.items()} == \
            {(r["qid"], r["docid"]): pytest.approx(r["score"], abs=0) for r in scores}
        # metrics recomputed here from the files with pytrec_eval directly
        qrels = {}
        for line in open(suite / name / "qrels.tsv").read().splitlines()[1:]:
            q, d, rel = line.split("\t")
            qrels.setdefault(q, {})[d] = int(rel)
        first = {}
        for line in open(suite / name / "candidates.trec"):
            q, _, d, rank, s, _ = line.split()
            if int(rank) <= 7:
                first.setdefault(q, {})[d] = float(s)
        for label, r in (("reranked", run), ("first_stage", first)):
            values = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recip_rank", "recall.100", "map"}).evaluate(r)
            for m in ("ndcg_cut_10", "recip_rank", "recall_100", "map"):
                expected = statistics.fmean(v[m] for v in values.values())
                assert report["datasets"][name][label][m] == pytest.approx(expected, abs=1e-12), (name, label, m)
        per_dataset[name] = report["datasets"][name]

    def mean(names, label, m="ndcg_cut_10"):
        return statistics.fmean(per_dataset[n][label][m] for n in names)

    assert report["tasks"]["it2it"]["reranked"]["map"] == pytest.approx(mean(["alpha", "beta"], "reranked", "map"))
    assert report["categories"]["cross-modal"]["reranked"]["ndcg_cut_10"] == pytest.approx(mean(["gamma"], "reranked"))
    assert report["categories"]["fused-modal"]["first_stage"]["recip_rank"] == \
        pytest.approx(mean(["alpha", "beta"], "first_stage", "recip_rank"))
    for label in ("first_stage", "reranked"):
        assert report["mrb_average"][label] == pytest.approx(mean(["alpha", "beta", "gamma"], label))
    md = open(out / "report.md").read()
    assert "| gamma | t2i |" in md and "MRB average" in md
    run_json = json.load(open(out / "run.json"))
    assert run_json["engine"]["manifest_sha256"] and run_json["versions"]["onnxruntime"]
    session = run_json["sessions"][-1]
    assert session["pairs_scored"] == 3 * 42 and session["datasets"]["alpha"]["padding_efficiency"] > 0

    # --datasets runs a subset; an unknown name is an input error
    code, _ = run_cli("--engine", engine, "--data", suite, "--out", tmp_path / "sub", "--datasets", "beta")
    assert code == 0 and os.listdir(tmp_path / "sub" / "beta") and not (tmp_path / "sub" / "alpha").exists()
    code, _ = run_cli("--engine", engine, "--data", suite, "--out", tmp_path / "sub2", "--datasets", "delta")
    assert code == 2


def _files(out):
    got = {}
    for dirpath, _, names in os.walk(out):
        for n in names:
            if n in ("scores.jsonl", "errors.jsonl", "run.trec", "report.json", "report.md"):
                got[os.path.relpath(os.path.join(dirpath, n), out)] = open(os.path.join(dirpath, n), "rb").read()
    return got


def _line_count(path):
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def test_resume_after_sigkill_gives_identical_output(engine, tmp_path):
    suite = tmp_path / "suite"
    mixed_dataset(str(suite), "one", n_queries=8, seed=4)
    mixed_dataset(str(suite), "two", n_queries=8, seed=5)
    with open(suite / "one" / "corpus.jsonl", "a") as f:  # one failing item too
        f.write(json.dumps({"id": "dx", "image": "images/missing.png"}) + "\n")
    with open(suite / "one" / "candidates.trec", "a") as f:
        f.write("q0 Q0 dx 11 0.1 first\nq5 Q0 dx 11 0.1 first\n")
    common = ["--engine", engine, "--data", suite, "--max-batch-size", 2, "--chunk-pairs", 12, "--threads", 1]
    assert main([str(a) for a in common] + ["--out", str(tmp_path / "ref"), "--quiet"]) == 0
    reference = _files(tmp_path / "ref")
    total = 8 * 10 * 2 + 2

    cmd = [sys.executable, "-m", "gmr_fast.score", *map(str, common), "--quiet"]
    # kill points: while loading, after the first written batch, mid-way through the second dataset
    for k, (watch, lines) in enumerate([(None, 0), ("one", 1), ("two", 40)]):
        out = tmp_path / f"killed{k}"
        proc = subprocess.Popen(cmd + ["--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if watch is None and (out / "job.json").exists():
                break
            if watch and _line_count(out / watch / "scores.jsonl") >= lines:
                break
            time.sleep(0.002)
        assert proc.poll() is None, f"the job ended before kill point {k}: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        written = sum(_line_count(out / d / f) for d in ("one", "two") for f in ("scores.jsonl", "errors.jsonl"))
        assert written < total
        resumed = subprocess.run(cmd + ["--out", str(out), "--resume"], cwd=ROOT, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr
        assert _files(out) == reference, f"kill point {k}"
        session = json.load(open(out / "run.json"))["sessions"][-1]
        # nothing written before the kill is computed again (a partly written batch reruns, but only
        # its unwritten rows are written)
        failed = sum(d["failed_this_session"] for d in session["datasets"].values())
        assert session["pairs_scored"] + failed == total - written

    # a line torn mid-write (the kill landed inside write()) is cut off and its batch recomputed
    out = tmp_path / "torn"
    assert main([str(a) for a in common] + ["--out", str(out), "--quiet"]) == 0
    path = out / "two" / "scores.jsonl"
    data = open(path, "rb").read()
    cut = data.rfind(b"\n", 0, len(data) // 2) + 30
    open(path, "wb").write(data[:cut])
    for name in ("run.trec",):
        os.remove(out / "two" / name)
    assert main([str(a) for a in common] + ["--out", str(out), "--quiet", "--resume"]) == 0
    assert _files(out) == reference


def test_resume_guards(engine, tmp_path, capsys):
    suite = tmp_path / "suite"
    mixed_dataset(str(suite), "one", n_queries=2, seed=6)
    out = tmp_path / "out"
    assert run_cli("--engine", engine, "--data", suite, "--out", out)[0] == 0
    code, err = run_cli("--engine", engine, "--data", suite, "--out", out, capsys=capsys)
    assert code == 2 and "pass --resume" in err
    code, err = run_cli("--engine", engine, "--data", suite, "--out", out, "--resume", "--top-k", 3, capsys=capsys)
    assert code == 2 and "top_k (100 then, 3 now)" in err
    before = _files(out)
    assert run_cli("--engine", engine, "--data", suite, "--out", out, "--resume")[0] == 0
    assert _files(out) == before  # a finished job resumes to the same files, nothing rescored
    assert json.load(open(out / "run.json"))["sessions"][-1]["pairs_scored"] == 0
    # a job file written before text_precision existed resumes where text pairs still run in the
    # variant's precision; one that says otherwise is refused
    job = json.load(open(out / "job.json"))
    assert job["text_precision"] == job["precision"]
    for recorded, resumes in ((None, True), ("bf16-gemm", False)):
        edited = {k: v for k, v in job.items() if k != "text_precision"}
        if recorded:
            edited["text_precision"] = recorded
        (out / "job.json").write_text(json.dumps(edited))
        code, err = run_cli("--engine", engine, "--data", suite, "--out", out, "--resume", capsys=capsys)
        assert (code == 0) == resumes and (resumes or f"text_precision ('bf16-gemm' then, '{job['precision']}' now)" in err)


def test_failures_are_recorded_and_paths_cannot_escape(engine, tmp_path, capsys):
    suite = tmp_path / "suite"
    outside = tmp_path / "secret.png"
    save_image(str(outside), 1)
    root = write_dataset(str(suite), "bad", "t2i",
                         [{"id": "q0", "text": "a red circle"}, {"id": "q1", "text": "x " * 400}],
                         [{"id": "ok", "image": "images/ok.png"}, {"id": "missing", "image": "images/none.png"},
                          {"id": "corrupt", "image": "images/corrupt.png"}, {"id": "dotdot", "image": "../secret.png"},
                          {"id": "absolute", "image": str(outside)}, {"id": "link", "image": "images/link.png"},
                          {"id": "text", "text": "two blue squares"}],
                         [("q0", "ok", 1), ("q1", "text", 1)],
                         [("q0", d, 1.0 - 0.1 * i) for i, d in enumerate(
                             ["ok", "missing", "corrupt", "dotdot", "absolute", "link", "text"])] + [("q1", "text", 1.0)])
    save_image(os.path.join(root, "images", "ok.png"), 2)
    open(os.path.join(root, "images", "corrupt.png"), "wb").write(b"\x89PNG\r\n\x1a\n not really")
    os.symlink(outside, os.path.join(root, "images", "link.png"))
    out = tmp_path / "out"
    code, _ = run_cli("--engine", engine, "--data", suite, "--out", out, "--max-length", 300, capsys=capsys)
    assert code == 0
    errors = {r["docid"] if r["qid"] == "q0" else r["qid"]: r["error"] for r in read_jsonl(out / "bad" / "errors.jsonl")}
    assert set(errors) == {"missing", "corrupt", "dotdot", "absolute", "link", "q1"}
    assert "document 'missing'" in errors["missing"] and "none.png" in errors["missing"]
    assert "corrupt.png" in errors["corrupt"]
    assert "contains '..'" in errors["dotdot"]
    assert "is absolute" in errors["absolute"]
    assert "leads outside the dataset directory" in errors["link"]
    assert "query 'q1'" in errors["q1"] and "300" in errors["q1"]  # too long even with no document text
    scored = {r["docid"] for r in read_jsonl(out / "bad" / "scores.jsonl")}
    assert scored == {"ok", "text"}
    report = json.load(open(out / "report.json"))
    assert report["datasets"]["bad"]["failed"] == 6 and report["datasets"]["bad"]["scored"] == 2
    # failed candidates stay in the run, in first-stage order, below every scored one
    ranked = [line.split()[2] for line in open(out / "bad" / "run.trec") if line.startswith("q0 ")]
    assert set(ranked[:2]) == {"ok", "text"} and ranked[2:] == ["missing", "corrupt", "dotdot", "absolute", "link"]

    # nothing scorable at all: exit code 2
    only_bad = tmp_path / "only_bad"
    write_dataset(str(only_bad), "x", "t2i", [{"id": "q0", "text": "q"}], [{"id": "d0", "image": "gone.png"}],
                  [("q0", "d0", 1)], [("q0", "d0", 1.0)])
    code, err = run_cli("--engine", engine, "--data", only_bad, "--out", tmp_path / "o2", capsys=capsys)
    assert code == 2 and "nothing could be scored" in err


def _valid(tmp_path):
    return write_dataset(str(tmp_path / "suite"), "ds", "t2t",
                         [{"id": "q0", "text": "a"}, {"id": "q1", "text": "b"}],
                         [{"id": "d0", "text": "x"}, {"id": "d1", "text": "y"}],
                         [("q0", "d0", 1)], [("q0", "d0", 2.0), ("q0", "d1", 1.0), ("q1", "d1", 1.0)])


@pytest.mark.parametrize("file,content,message", [
    ("dataset.json", '{"name": "ds", "task": "t2x"}', "dataset.json: 'task' must be one of"),
    ("dataset.json", None, "dataset.json: missing"),
    ("queries.jsonl", None, "queries.jsonl: file not found"),
])
def test_an_unusable_file_stops_the_job_before_anything_is_written(engine, tmp_path, capsys, file, content, message):
    root = _valid(tmp_path)
    if content is None:
        os.remove(os.path.join(root, file))
    else:
        open(os.path.join(root, file), "w").write(content)
    code, err = run_cli("--engine", engine, "--data", tmp_path / "suite", "--out", tmp_path / "out", capsys=capsys)
    assert code == 2
    assert message in err
    assert os.path.join("ds", file) in err
    assert not (tmp_path / "out").exists()  # checked before anything is written


@pytest.mark.parametrize("file,content,message", [
    ("dataset.json", '{"name": "bad", "task": "t2x"}', "dataset.json: 'task' must be one of"),
    ("dataset.json", None, "dataset.json: missing"),
    ("corpus.jsonl", None, "corpus.jsonl: file not found"),
])
def test_an_unusable_dataset_is_left_out_of_its_suite_and_done_on_resume(engine, tmp_path, capsys, file, content,
                                                                           message):
    """In a suite, a dataset that cannot be read at all is named and left out; the others are
    scored and evaluated, the report says which is missing from every mean, and the exit code is 2.
    Once it is fixed, --resume scores it without redoing the others."""
    suite = tmp_path / "suite"
    mixed_dataset(str(suite), "good", n_queries=2, seed=11)
    bad = write_dataset(str(suite), "bad", "t2t", [{"id": "q0", "text": "a"}],
                        [{"id": "d0", "text": "x"}, {"id": "d1", "text": "y"}],
                        [("q0", "d0", 1)], [("q0", "d0", 2.0), ("q0", "d1", 1.0)])
    saved = open(os.path.join(bad, file)).read()
    if content is None:
        os.remove(os.path.join(bad, file))
    else:
        open(os.path.join(bad, file), "w").write(content)
    out = tmp_path / "out"
    code, err = run_cli("--engine", engine, "--data", suite, "--out", out, capsys=capsys)
    assert code == 2
    assert "1 of 2 datasets could not be read" in err and message in err and os.path.join("bad", file) in err
    report = json.load(open(out / "report.json"))
    assert list(report["datasets"]) == ["good"] and report["datasets"]["good"]["scored"] > 0
    assert message in report["unreadable"]["bad"]
    assert report["mrb_average"]["datasets"] == 1 and report["mrb_average"]["unreadable"] == 1
    assert "could not be read" in open(out / "report.md").read()
    assert json.load(open(out / "run.json"))["sessions"][-1]["unreadable_datasets"] == report["unreadable"]
    assert not (out / "bad").exists()
    good_scores = (out / "good" / "scores.jsonl").read_bytes()

    open(os.path.join(bad, file), "w").write(saved)
    code, err = run_cli("--engine", engine, "--data", suite, "--out", out, "--resume", capsys=capsys)
    assert code == 0, err
    report = json.load(open(out / "report.json"))
    assert set(report["datasets"]) == {"good", "bad"} and report["unreadable"] == {}
    assert report["datasets"]["bad"]["scored"] == 2
    assert (out / "good" / "scores.jsonl").read_bytes() == good_scores  # nothing redone
    assert json.load(open(out / "run.json"))["sessions"][-1]["pairs_scored"] == 2


# (file, content, the malformed lines recorded as {file, line, error}, pairs that fail, pairs scored)
MALFORMED_ROWS = [
    ("queries.jsonl", '{"id": "q0", "text": "a"}\n{"id": "q1", "text": \n',
     {("queries.jsonl", 2): "not valid JSON", ("candidates.trec", 3): "unknown query id 'q1'"}, {}, {"q0/d0", "q0/d1"}),
    ("queries.jsonl", '{"id": "q0", "text": "a"}\n{"id": "q0", "text": "b"}\n{"id": "q1", "text": "b"}\n',
     {("queries.jsonl", 2): "duplicate id 'q0'"},
     {"q0/d0": "queries.jsonl:2: duplicate id 'q0'", "q0/d1": "duplicate id 'q0'"}, {"q1/d1"}),
    ("corpus.jsonl", '{"id": "d0", "text": "x"}\n{"id": "d1"}\n',
     {("corpus.jsonl", 2): "'d1' has neither"}, {"q0/d1": "corpus.jsonl:2: 'd1' has neither", "q1/d1": "neither"},
     {"q0/d0"}),
    ("corpus.jsonl", '{"id": "d0", "text": "x"}\n{"id": "d1\\udc80", "text": "y"}\n',
     {("corpus.jsonl", 2): "not valid Unicode text"},
     {"q0/d1": "document 'd1': not in corpus.jsonl", "q1/d1": "not in corpus.jsonl"}, {"q0/d0"}),
    ("corpus.jsonl", '{"id": "d0", "text": "x"}\n["d1"]\n{"id": "d1", "text": "y"}\n',
     {("corpus.jsonl", 2): "expected a JSON object, got list"}, {}, {"q0/d0", "q0/d1", "q1/d1"}),
    ("qrels.tsv", "query_id\tdoc_id\trelevance\nq0\td0\t1\nq9\td0\t1\n",
     {("qrels.tsv", 3): "unknown query id 'q9'"}, {}, {"q0/d0", "q0/d1", "q1/d1"}),
    ("qrels.tsv", "q0\td0\t1\nq0\td1\thigh\n",
     {("qrels.tsv", 2): "relevance must be an integer"}, {}, {"q0/d0", "q0/d1", "q1/d1"}),
    ("candidates.trec", "q0 Q0 d0 1 2.0 r\nq7 Q0 d1 2 1.0 r\n",
     {("candidates.trec", 2): "unknown query id 'q7'"}, {}, {"q0/d0"}),
    ("candidates.trec", "q0 Q0 d0 1 2.0 r\nq0 Q0 d9 2 1.0 r\n",
     {}, {"q0/d9": "document 'd9': not in corpus.jsonl"}, {"q0/d0"}),
    ("candidates.trec", "q0 Q0 d0 1 2.0 r\nq0 Q0 d0 2 1.0 r\n",
     {("candidates.trec", 2): "duplicate candidate"}, {}, {"q0/d0"}),
    ("candidates.trec", "q0 Q0 d0 1 2.0 r\nq0 Q0 d1 2 1.0\n",
     {("candidates.trec", 2): "expected 'qid Q0 docid rank score tag'"}, {}, {"q0/d0"}),
]


def test_bytes_that_are_not_utf8_fail_their_line_and_a_bom_is_read_past(engine, tmp_path, capsys):
    """A Latin-1 byte in any line of any file stopped the whole job with a UnicodeDecodeError (rc 1);
    it is now that line's problem, recorded with the byte and column. A UTF-8 byte-order mark at a
    file's start (Windows tools write one) is read past instead of failing the first line."""
    root = _valid(tmp_path)
    bom = b"\xef\xbb\xbf"
    for name, data in (("queries.jsonl", bom + b'{"id": "q0", "text": "a"}\n{"id": "q1", "text": "caf\xe9"}\n'),
                       ("candidates.trec", b"q0 Q0 d0 1 2.0 r\nq0 Q0 d\xe91 2 1.0 r\nq0 Q0 d1 3 0.5 r\n"),
                       ("qrels.tsv", bom + b"q0\td0\t1\nq0\td\xe9\t1\n")):
        (tmp_path / "suite" / "ds" / name).write_bytes(data)
    out = tmp_path / "out"
    code, err = run_cli("--engine", engine, "--data", tmp_path / "suite", "--out", out, capsys=capsys)
    assert code == 0, err
    lines = {(r["file"], r["line"]): r["error"] for r in read_jsonl(out / "ds" / "errors.jsonl") if "file" in r}
    assert lines == {("queries.jsonl", 2): lines[("queries.jsonl", 2)], ("candidates.trec", 2): lines[("candidates.trec", 2)],
                     ("qrels.tsv", 2): lines[("qrels.tsv", 2)]}
    assert "not UTF-8 text (byte 0xe9 at column 26)" in lines[("queries.jsonl", 2)]
    assert "byte 0xe9 at column 8" in lines[("candidates.trec", 2)] and "byte 0xe9 at column 5" in lines[("qrels.tsv", 2)]
    assert {f"{r['qid']}/{r['docid']}" for r in read_jsonl(out / "ds" / "scores.jsonl")} == {"q0/d0", "q0/d1"}
    # pairs mode: the same
    src = tmp_path / "pairs.jsonl"
    src.write_bytes(bom + b'{"id": "a", "query": "q", "document": "d"}\n{"id": "b", "query": "q", "document": "\xff"}\n')
    code, err = run_cli("--engine", engine, "--input", src, "--output", tmp_path / "p.jsonl", capsys=capsys)
    assert code == 0 and [r["id"] for r in read_jsonl(tmp_path / "p.jsonl")] == ["a"]
    assert "pairs.jsonl:2: not UTF-8 text (byte 0xff" in err


@pytest.mark.parametrize("file,content,lines,failed,scored", MALFORMED_ROWS)
def test_a_malformed_row_fails_only_itself_and_is_recorded_once(engine, tmp_path, capsys, file, content, lines,
                                                                 failed, scored):
    """A malformed line is recorded in errors.jsonl ({file, line, error}) and warned about; a
    query or document row that names its id fails the pairs that use it; everything else is
    scored, evaluated and resumable as ever."""
    root = _valid(tmp_path)
    open(os.path.join(root, file), "w").write(content)
    out = tmp_path / "out"
    code, err = run_cli("--engine", engine, "--data", tmp_path / "suite", "--out", out, capsys=capsys)
    assert code == 0, err
    rows = read_jsonl(out / "ds" / "errors.jsonl")
    got_lines = {(r["file"], r["line"]): r["error"] for r in rows if "file" in r}
    assert set(got_lines) == set(lines)
    for where, message in lines.items():
        assert message in got_lines[where] and f"{os.path.join('ds', where[0])}:{where[1]}: " in got_lines[where]
        assert message in err  # warned on stderr too
    got_failed = {f"{r['qid']}/{r['docid']}": r["error"] for r in rows if "qid" in r}
    assert set(got_failed) == set(failed) and all(m in got_failed[k] for k, m in failed.items())
    assert {f"{r['qid']}/{r['docid']}" for r in read_jsonl(out / "ds" / "scores.jsonl")} == scored
    report = json.load(open(out / "report.json"))
    assert report["datasets"]["ds"]["malformed_rows"] == len(lines)
    assert report["datasets"]["ds"]["failed"] == len(failed) and report["datasets"]["ds"]["scored"] == len(scored)
    assert {line.split()[2] for line in open(out / "ds" / "run.trec")} >= {k.split("/")[1] for k in scored}
    before = (out / "ds" / "errors.jsonl").read_bytes()
    assert run_cli("--engine", engine, "--data", tmp_path / "suite", "--out", out, "--resume")[0] == 0
    assert (out / "ds" / "errors.jsonl").read_bytes() == before  # recorded once, nothing redone


def test_image_cache_carries_images_across_chunks(engine, tmp_path):
    """Candidate lists that share images (top-k lists over one corpus): by default the job's plan
    keeps each image a later chunk uses, so it is encoded once, not once per chunk (as an LRU
    cache given room does), and the scores do not change."""
    for d in range(2):
        save_image(str(tmp_path / "img" / f"{d}.png"), 10 + d)
    rows = [{"id": f"q{q}d{d}", "query": f"query number {q}", "document": {"image": f"img/{d}.png"}}
            for q in range(3) for d in range(2)]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = {}
    for name, extra in (("plain", ["--no-image-cache-plan"]), ("planned", []),
                        ("lru", ["--no-image-cache-plan", "--image-cache-mb", "64"])):
        out = tmp_path / name / "scores.jsonl"
        # chunks of 2 pairs: one query's two documents each, so every chunk needs both images
        assert run_cli("--engine", engine, "--input", src, "--output", out, "--chunk-pairs", 2, *extra)[0] == 0
        stats = json.load(open(tmp_path / name / "scores.run.json"))["sessions"][-1]["datasets"]["pairs"]
        got[name] = ({r["id"]: r["score"] for r in read_jsonl(out)}, stats["images_encoded"], stats["image_cache_hits"],
                     stats.get("recurring_images"))
    assert got["plain"][1:] == (6, 0, None) and got["lru"][1:] == (2, 4, None) and got["planned"][1:] == (2, 4, 2)
    for name in ("planned", "lru"):  # the same vision runs, bit for bit
        assert got[name][0] == got["plain"][0] and len(got["plain"][0]) == 6


def test_image_plan_keeps_what_is_needed_soonest_within_its_budget(engine, tmp_path):
    """The job's plan (jobs.ImagePlan) against an LRU cache of the same size: documents A B C A B
    C B, one chunk each, room for two images. LRU evicts the image needed next until the last B
    (6 encodes); the plan does not keep C (needed after A and B), drops A after its last use,
    and encodes 4. An image no later chunk uses is never kept; the scores are the uncached ones."""
    from gmr_fast.jobs import Journal, Stats, Task, run_tasks
    from gmr_fast.prompt import Item

    paths = []
    for d in range(3):
        save_image(str(tmp_path / f"{d}.png"), 20 + d)
        paths.append(os.path.realpath(tmp_path / f"{d}.png"))
    order = [0, 1, 2, 0, 1, 2, 1]
    tasks = [Task(f"p{i}", Item(text=f"query {i}"), Item(image=paths[d]), None, {"id": f"p{i}"}, f"pair {i}")
             for i, d in enumerate(order)]
    bounds = [(i, i + 1) for i in range(len(tasks))]
    one = Reranker(engine, image_cache_size=1)
    one.score([("q", {"image": paths[0]})])
    size = one.image_cache["bytes"]  # the three images are the same size: one embedding's bytes

    def job(name, reranker, budget=None):
        scores = Journal(str(tmp_path / f"{name}.jsonl"), lambda r: r["id"])
        errors = Journal(str(tmp_path / f"{name}.errors.jsonl"), lambda r: r["id"])
        stats = Stats(pairs=len(tasks))

        class Quiet:
            def update(self, n):
                pass

        run_tasks(reranker, tasks, bounds, scores, errors, Quiet(), stats, budget)
        scores.close()
        errors.close()
        return {r["id"]: r["score"] for r in scores.rows}, stats

    plain, plain_stats = job("plain", Reranker(engine))
    lru, lru_stats = job("lru", Reranker(engine, image_cache_size=2))
    planned_reranker = Reranker(engine)
    planned, planned_stats = job("planned", planned_reranker, 2 * size)
    assert (plain_stats.images_encoded, lru_stats.images_encoded, lru_stats.image_cache_hits) == (7, 6, 1)
    # A, B, C encoded; A and B from the cache (A dropped then); C encoded again; B from the cache
    assert (planned_stats.images_encoded, planned_stats.image_cache_hits, planned_stats.recurring_images) == (4, 3, 3)
    assert planned == plain == lru and len(plain) == 7
    assert planned_reranker.image_cache == {"entries": 0, "bytes": 0}  # emptied when the job's tasks are done
    _, small = job("small", Reranker(engine), size - 1)  # no room for one: nothing kept, nothing lost
    assert (small.images_encoded, small.image_cache_hits) == (7, 0)


def test_pairs_mode(engine, tmp_path, capsys):
    save_image(str(tmp_path / "img" / "a.png"), 3)
    rows = [{"id": "r0", "query": "red circle", "document": "a red circle on white"},
            {"id": "r1", "query": {"text": "what is this", "image": "img/a.png"}, "document": "noise", "instruction": "Judge."},
            {"id": "r2", "query": "blue", "document": {"image": "img/a.png"}},
            {"id": "r3", "query": "blue", "document": {"image": "img/none.png"}}]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "res" / "scores.jsonl"
    code, _ = run_cli("--engine", engine, "--input", src, "--output", out)
    assert code == 0
    got = {r["id"]: r["score"] for r in read_jsonl(out)}
    errors = read_jsonl(tmp_path / "res" / "scores.errors.jsonl")
    assert set(got) == {"r0", "r1", "r2"} and [e["id"] for e in errors] == ["r3"] and "none.png" in errors[0]["error"]
    reranker = Reranker(engine)
    img = str(tmp_path / "img" / "a.png")
    expected = [reranker.score([("red circle", "a red circle on white")])[0],
                reranker.score([({"text": "what is this", "image": img}, "noise")], instruction="Judge.")[0],
                reranker.score([("blue", {"image": img})])[0]]
    np.testing.assert_allclose([got["r0"], got["r1"], got["r2"]], expected, atol=1e-5)
    # resume: more rows appended to the input are scored, finished ones are not redone
    src.write_text(src.read_text() + json.dumps({"id": "r4", "query": "q", "document": "d"}) + "\n")
    before = out.read_bytes()
    assert run_cli("--engine", engine, "--input", src, "--output", out, "--resume")[0] == 0
    assert out.read_bytes().startswith(before) and [r["id"] for r in read_jsonl(out)][-1] == "r4"
    # malformed rows fail only themselves: a row with a usable id by its id, any other line by its number
    src.write_text("\n".join([json.dumps(rows[0]), json.dumps(rows[0]),
                              json.dumps({"id": "x", "query": {"txt": "a"}, "document": "d"}),
                              '{"id": "y", "query": ', "[1, 2]", json.dumps({"query": "q", "document": "d"}),
                              json.dumps({"id": "z", "query": "q"}), json.dumps(rows[2]),
                              json.dumps({"id": "u", "query": "q", "document": "cut \udc80 here"}),
                              json.dumps({"id": "v\udc80", "query": "q", "document": "d"})]) + "\n")
    o = tmp_path / "o.jsonl"
    code, err = run_cli("--engine", engine, "--input", src, "--output", o, capsys=capsys)
    assert code == 0 and "pairs.jsonl:2: duplicate id 'r0'" in err
    assert [r["id"] for r in read_jsonl(o)] == ["r0", "r2"]
    errors = read_jsonl(tmp_path / "o.errors.jsonl")
    by_id = {r["id"]: r["error"] for r in errors if "id" in r}
    assert "pairs.jsonl:3: 'query' must be" in by_id["x"] and "pairs.jsonl:7: row 'z' has no 'document'" in by_id["z"]
    assert "row 'u' document text: not valid Unicode text" in by_id["u"]  # a lone surrogate: that row only
    by_line = {r["line"]: r["error"] for r in errors if "id" not in r}
    assert sorted(by_line) == [2, 4, 5, 6, 10] and all(r.get("file") == "pairs.jsonl" for r in errors if "id" not in r)
    assert "'id' 'v\\udc80': not valid Unicode text" in by_line[10]  # no output could hold it
    assert "not valid JSON" in by_line[4] and "expected a JSON object, got list" in by_line[5]
    assert "'id' must be a non-empty string" in by_line[6]
    before = (tmp_path / "o.errors.jsonl").read_bytes()
    assert run_cli("--engine", engine, "--input", src, "--output", o, "--resume")[0] == 0
    assert (tmp_path / "o.errors.jsonl").read_bytes() == before and len(read_jsonl(o)) == 2
    run_json = json.load(open(tmp_path / "o.run.json"))
    assert run_json["sessions"][0]["datasets"]["pairs"]["malformed_rows"] == 5
    # nothing usable at all: exit code 2
    src.write_text("not json\n")
    code, err = run_cli("--engine", engine, "--input", src, "--output", tmp_path / "o2.jsonl", capsys=capsys)
    assert code == 2 and "nothing could be scored" in err


def test_a_directory_that_is_not_an_engine_is_named(tmp_path, capsys):
    src = tmp_path / "pairs.jsonl"
    src.write_text(json.dumps({"id": "r0", "query": "q", "document": "d"}) + "\n")
    code, err = run_cli("--engine", tmp_path / "missing", "--input", src, "--output", tmp_path / "o.jsonl", capsys=capsys)
    assert code == 3 and "is not an engine directory (no manifest.json)" in err and "I/O error" not in err
    assert not (tmp_path / "o.jsonl").exists()
