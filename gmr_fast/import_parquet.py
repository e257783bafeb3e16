"""``python -m gmr_fast.import_parquet``: a published parquet dataset -> the score CLI's format.

    python -m gmr_fast.import_parquet --src DIR --out DATASET_DIR --task t2i
        [--name NAME] [--instruction TEXT] [--candidates first_stage.trec]

Reads the UMRB-style layout (``corpus``, ``query``/``queries`` and ``qrels`` tables, each as
``NAME.parquet``, ``NAME-*.parquet`` or a ``NAME/`` directory of parquet files; images as
HuggingFace image structs ``{bytes, path}``, raw bytes, or paths relative to ``--src``) and
writes ``dataset.json``, ``queries.jsonl``, ``corpus.jsonl``, ``qrels.tsv``, the images under
``images/``, and ``candidates.trec`` when a first-stage run is given (checked against the ids).
Tables are streamed in record batches, so multi-GB corpora do not have to fit in memory.
A malformed row fails only itself: it is listed in ``import_errors.jsonl`` (``{file, row, error}``)
and warned about, and the rest is imported. A row with a usable id but a duplicate id or no
content is written as it is, so that scoring fails the pairs that use it with the file and line.
Needs ``pyarrow`` (``pip install gmr_fast[eval]``).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import re
import shutil
import sys

from PIL import Image

from .errors import GmrError
from .suite import TASK_CATEGORIES, InputError, read_trec_run

ID_COLUMNS = {"corpus": ("id", "corpus-id", "corpus_id", "_id", "docid", "doc_id"),
              "query": ("id", "query-id", "query_id", "_id", "qid")}
TEXT_COLUMNS = ("text", "query", "caption", "contents")
QRELS_COLUMNS = (("query-id", "query_id", "qid"), ("corpus-id", "corpus_id", "docid", "doc_id"),
                 ("score", "relevance", "label", "rel"))


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GmrError("reading parquet needs pyarrow: pip install 'gmr_fast[eval]' (or pip install pyarrow)") from None
    return pq


def table_files(src: str, names: tuple[str, ...]) -> list[str]:
    for name in names:
        files = sorted(glob.glob(os.path.join(src, f"{name}.parquet")) + glob.glob(os.path.join(src, f"{name}-*.parquet"))
                       + glob.glob(os.path.join(src, name, "**", "*.parquet"), recursive=True))
        if files:
            return files
    raise InputError(src, f"no parquet table named {' or '.join(names)} ({names[0]}.parquet, {names[0]}-*.parquet "
                          f"or {names[0]}/*.parquet)")


def _rows(files: list[str]):
    """Yields (file, row number within file (1-based), row dict) streaming record batches."""
    pq = _pyarrow_parquet()
    for path in files:
        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                n += 1
                yield path, n, row


def _pick(row: dict, names: tuple[str, ...]):
    for name in names:
        if name in row:
            return name
    return None


def _safe_name(rid: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", rid)[:80].lstrip(".") or "item"
    return f"{stem}-{hashlib.blake2b(rid.encode(), digest_size=4).hexdigest()}"


def _image_format(data: bytes) -> str:
    try:
        fmt = Image.open(io.BytesIO(data)).format  # reads the header only
    except Exception:  # noqa: BLE001 - unreadable bytes are kept; scoring reports them per item
        return "bin"
    return {"JPEG": "jpg"}.get(fmt, (fmt or "bin").lower())


def _write_records(kind: str, files: list[str], src: str, out: str, problems: list[dict]) -> set[str]:
    """Writes the table's rows; a row without a usable id is left out, one with a duplicate id or
    neither text nor image is written for scoring to fail its pairs; each is listed in ``problems``."""
    id_cols, ids = ID_COLUMNS[kind], set()
    image_dir = os.path.join(out, "images", kind)
    jsonl = os.path.join(out, "queries.jsonl" if kind == "query" else "corpus.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        for path, n, row in _rows(files):
            id_col = _pick(row, id_cols)
            if id_col is None:
                raise InputError(path, f"no id column (looked for {', '.join(id_cols)})")
            rid = "" if row[id_col] is None else str(row[id_col])
            if not rid or any(c.isspace() for c in rid):
                problems.append({"file": path, "row": n, "error": f"id {rid!r} is empty or contains whitespace; "
                                                                   "row left out"})
                continue
            if rid in ids:
                problems.append({"file": path, "row": n, "error": f"duplicate id {rid!r}: written, scoring fails "
                                                                   "the pairs that use it"})
            ids.add(rid)
            record: dict = {"id": rid}
            text_col = _pick(row, TEXT_COLUMNS)
            if text_col is not None and row[text_col] not in (None, ""):
                record["text"] = str(row[text_col])
            image = row.get("image")
            data, given = None, None
            if isinstance(image, dict):
                data, given = image.get("bytes"), image.get("path")
            elif isinstance(image, (bytes, bytearray)):
                data = bytes(image)
            elif isinstance(image, str) and image:
                given = image
            if data is not None or given:
                os.makedirs(image_dir, exist_ok=True)
                if data is not None:
                    name = f"{_safe_name(rid)}.{_image_format(data)}"
                    with open(os.path.join(image_dir, name), "wb") as img:
                        img.write(data)
                else:
                    ext = os.path.splitext(given)[1].lower() or ".bin"
                    name = f"{_safe_name(rid)}{ext}"
                    source = given if os.path.isabs(given) else os.path.join(src, given)
                    if os.path.isfile(source):  # a missing one stays missing: scoring reports it per item
                        shutil.copyfile(source, os.path.join(image_dir, name))
                record["image"] = f"images/{kind}/{name}"
            if "text" not in record and "image" not in record:
                problems.append({"file": path, "row": n, "error": f"{kind} {rid!r} has neither text nor image: "
                                                                   "written, scoring fails the pairs that use it"})
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return ids


def import_dataset(src: str, out: str, task: str, name: str | None = None, instruction: str | None = None,
                   candidates: str | None = None) -> str:
    if task not in TASK_CATEGORIES:
        raise GmrError(f"--task must be one of {', '.join(TASK_CATEGORIES)}, got {task!r}")
    if os.path.exists(os.path.join(out, "dataset.json")):
        raise GmrError(f"{out} already holds a dataset; choose a new --out")
    files = {k: table_files(src, names) for k, names in
             (("corpus", ("corpus",)), ("query", ("query", "queries")), ("qrels", ("qrels",)))}
    os.makedirs(out, exist_ok=True)
    problems: list[dict] = []
    corpus_ids = _write_records("corpus", files["corpus"], src, out, problems)
    query_ids = _write_records("query", files["query"], src, out, problems)
    for kind, ids in (("corpus", corpus_ids), ("query", query_ids)):
        if not ids:
            raise InputError(files[kind][0], f"no usable {kind} row (every id empty or missing)")
    with open(os.path.join(out, "qrels.tsv"), "w", encoding="utf-8") as f:
        f.write("query_id\tdoc_id\trelevance\n")
        for path, n, row in _rows(files["qrels"]):
            cols = [_pick(row, names) for names in QRELS_COLUMNS]
            if None in cols:
                raise InputError(path, f"qrels need query id, corpus id and score columns (one of {QRELS_COLUMNS})")
            qid, docid, rel = (row[c] for c in cols)
            qid, docid = str(qid), str(docid)
            if qid not in query_ids or docid not in corpus_ids:
                unknown = f"query id {qid!r}" if qid not in query_ids else f"corpus id {docid!r}"
                problems.append({"file": path, "row": n, "error": f"unknown {unknown}; judgement left out"})
                continue
            try:
                value = float(rel)
            except (TypeError, ValueError):
                value = -1.0
            if value != int(value) or value < 0:
                problems.append({"file": path, "row": n, "error": f"relevance must be an integer >= 0, got {rel!r}; "
                                                                   "judgement left out"})
                continue
            f.write(f"{qid}\t{docid}\t{int(value)}\n")
    if candidates:  # copied whole: scoring records a malformed line or an unknown id by its line, as listed here
        listed: list[InputError] = []
        run = read_trec_run(candidates, dict.fromkeys(query_ids), dict.fromkeys(corpus_ids), listed)
        problems += [{"file": e.path, "row": e.line, "error": e.message} for e in listed]
        problems += [{"file": candidates, "row": None, "error": f"candidate ({qid!r}, {docid!r}): document not in "
                                                                "the corpus; scoring fails that pair"}
                     for qid, docs in run.items() for docid in docs if docid not in corpus_ids]
        shutil.copyfile(candidates, os.path.join(out, "candidates.trec"))
    errors_path = os.path.join(out, "import_errors.jsonl")
    if problems:
        with open(errors_path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in problems)
    elif os.path.exists(errors_path):  # from an import that stopped before dataset.json
        os.remove(errors_path)
    for p in problems[:5]:
        where = f": row {p['row']}" if p["row"] else ""
        print(f"gmr_fast.import_parquet: {p['file']}{where}: {p['error']}", file=sys.stderr)
    if problems:
        print(f"gmr_fast.import_parquet: {len(problems)} malformed row(s) in all, listed in {errors_path}",
              file=sys.stderr)
    meta = {"name": name or os.path.basename(os.path.normpath(out)), "task": task}
    if instruction:
        meta["instruction"] = instruction
    with open(os.path.join(out, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gmr_fast.import_parquet", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="directory with the corpus / query / qrels parquet tables")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--task", required=True, choices=sorted(TASK_CATEGORIES))
    p.add_argument("--name", help="dataset name (default: the --out directory's name)")
    p.add_argument("--instruction", help="the dataset's reranking instruction")
    p.add_argument("--candidates", help="first-stage run (TREC format) to copy in as candidates.trec")
    args = p.parse_args(argv)
    try:
        import_dataset(args.src, args.out, args.task, args.name, args.instruction, args.candidates)
    except (GmrError, OSError) as e:
        print(f"gmr_fast.import_parquet: error: {e}", file=sys.stderr)
        return 2
    if not args.candidates:
        print(f"{args.out}: written without candidates.trec; add the first-stage run (qid Q0 docid rank score tag) "
              f"before scoring", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
