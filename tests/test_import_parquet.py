"""The parquet import writes the score CLI's format from UMRB-style tables."""

import io
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

    # errors name the table and row
    assert main(["--src", str(src), "--out", str(out), "--task", "it2it"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    pq.write_table(pa.table({"query-id": ["q1", "q9"], "corpus-id": ["c1", "c1"], "score": [1, 1]}), src / "qrels.parquet")
    assert main(["--src", str(src), "--out", str(tmp_path / "ds2"), "--task", "it2it"]) == 2
    err = capsys.readouterr().err
    assert "qrels.parquet" in err and "row 2" in err and "'q9'" in err
    os.remove(src / "query.parquet")
    assert main(["--src", str(src), "--out", str(tmp_path / "ds3"), "--task", "it2it"]) == 2
    assert "no parquet table named query or queries" in capsys.readouterr().err
