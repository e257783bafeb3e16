"""The parquet import writes the score CLI's format from UMRB-style tables."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from gmr_fast.import_parquet import main  # noqa: E402
from gmr_fast.suite import load_dataset  # noqa: E402


def png_bytes(seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def image_struct(data, path):
    return {"bytes": data, "path": path}


def test_umrb_layout_round_trip(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "corpus").mkdir(parents=True)
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    corpus = pa.table({"id": ["c1", "c 2", "c3"], "modality": ["image", "text", "image,text"],
                       "text": [None, "a caption", "both"],
                       "image": pa.array([image_struct(png_bytes(1), "x.png"), None, image_struct(png_bytes(2), None)],
                                         img_type)})
    # the corpus is split over two files in a directory, as HF's parquet converter writes it
    pq.write_table(corpus.slice(0, 2).set_column(0, "id", pa.array(["c1", "c2"])), src / "corpus" / "part-0.parquet")
    pq.write_table(corpus.slice(2, 1), src / "corpus" / "part-1.parquet")
    pq.write_table(pa.table({"id": ["q1", "q2"], "modality": ["text", "image"], "text": ["find it", None],
                             "image": pa.array([None, image_struct(png_bytes(3), "q.png")], img_type)}),
                   src / "query.parquet")
    pq.write_table(pa.table({"query-id": ["q1", "q2"], "Q0": ["0", "0"], "corpus-id": ["c1", "c3"],
                             "score": pa.array([1, 2], pa.int8())}), src / "qrels.parquet")
    run = tmp_path / "first.trec"
    run.write_text("q1 Q0 c1 1 0.9 gme\nq1 Q0 c2 2 0.5 gme\nq2 Q0 c3 1 0.7 gme\n")
    out = tmp_path / "ds"
    assert main(["--src", str(src), "--out", str(out), "--task", "it2it", "--instruction", "Find it.",
                 "--candidates", str(run)]) == 0
    ds = load_dataset(str(out))
    assert ds.name == "ds" and ds.task == "it2it" and ds.instruction == "Find it."
    assert ds.corpus["c2"].text == "a caption" and ds.corpus["c2"].image is None
    assert open(out / ds.corpus["c1"].image, "rb").read() == png_bytes(1)
    assert ds.corpus["c1"].image.endswith(".png") and ds.corpus["c1"].text is None
    assert open(out / ds.queries["q2"].image, "rb").read() == png_bytes(3)
    assert ds.qrels == {"q1": {"c1": 1}, "q2": {"c3": 2}}
    assert [d for d, _ in ds.candidates["q1"]] == ["c1", "c2"]

    assert not (out / "import_errors.jsonl").exists()

    # unusable arguments and tables stop the import, naming them
    assert main(["--src", str(src), "--out", str(out), "--task", "it2it"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    pq.write_table(pa.table({"query-id": ["q1"], "score": [1]}), src / "qrels.parquet")
    assert main(["--src", str(src), "--out", str(tmp_path / "ds1"), "--task", "it2it"]) == 2
    assert "qrels.parquet" in capsys.readouterr().err

    # a malformed row fails only itself: listed (table and row), warned about, the rest imported;
    # one with a usable id is written for scoring to fail its pairs
    pq.write_table(pa.table({"id": ["c1", "", "c1", "c4", "c5"], "text": ["one", "no id", "again", None, "five"]}),
                   src / "corpus" / "part-1.parquet")
    os.remove(src / "corpus" / "part-0.parquet")
    pq.write_table(pa.table({"query-id": ["q1", "q9", "q1", "q2"], "corpus-id": ["c1", "c1", "c5", "c5"],
                             "score": ["1", "1", "high", "2"]}), src / "qrels.parquet")
    run.write_text("q1 Q0 c1 1 0.9 gme\nq1 Q0 c2 2 0.5 gme\nq2 Q0 c5 1 x gme\nq2 Q0 c5 1 0.4 gme\n")
    ds2 = tmp_path / "ds2"
    assert main(["--src", str(src), "--out", str(ds2), "--task", "it2it", "--candidates", str(run)]) == 0
    err = capsys.readouterr().err
    listed = [json.loads(line) for line in open(ds2 / "import_errors.jsonl")]
    got = {(os.path.basename(p["file"]), p["row"]): p["error"] for p in listed}
    assert set(got) == {("part-1.parquet", 2), ("part-1.parquet", 3), ("part-1.parquet", 4), ("qrels.parquet", 2),
                        ("qrels.parquet", 3), ("first.trec", 3), ("first.trec", None)}
    assert "empty" in got["part-1.parquet", 2] and "duplicate id 'c1'" in got["part-1.parquet", 3]
    assert "neither text nor image" in got["part-1.parquet", 4] and "'q9'" in got["qrels.parquet", 2]
    assert "'high'" in got["qrels.parquet", 3] and "'c2'" in got["first.trec", None]
    assert "qrels.parquet: row 2" in err and "7 malformed row(s)" in err
    ds = load_dataset(str(ds2))  # what scoring makes of it: the written rows fail their pairs, by line
    assert ds.qrels == {"q1": {"c1": 1}, "q2": {"c5": 2}} and ds.corpus["c5"].text == "five"
    assert ds.corpus["c1"].error and "duplicate id 'c1'" in ds.corpus["c1"].error
    assert ds.corpus["c4"].error and "neither" in ds.corpus["c4"].error
    assert [d for d, _ in ds.candidates["q1"]] == ["c1", "c2"] and [d for d, _ in ds.candidates["q2"]] == ["c5"]
    os.remove(src / "query.parquet")
    assert main(["--src", str(src), "--out", str(tmp_path / "ds3"), "--task", "it2it"]) == 2
    assert "no parquet table named query or queries" in capsys.readouterr().err
