"""The MRB-style data format the score CLI reads (README, "Data format").

A suite is a directory of datasets; a dataset is a directory with ``dataset.json``,
``queries.jsonl``, ``corpus.jsonl``, ``qrels.tsv`` and ``candidates.trec``. Everything is read
and checked before any scoring starts. A file that is missing or unusable as a whole (no
dataset.json, an unknown task) stops the job there with one message naming it (``InputError``).
A malformed *row* fails only itself: ``load_dataset`` keeps the others and lists each bad one
(``Dataset.problems``, an ``InputError`` naming file and line) for the job to record. A query or
document row that names its id but is otherwise malformed (or whose id is used twice) stays as a
``Record`` with ``error`` set, so every pair that uses it fails with that message; a candidate
whose document is not in the corpus stays in the first stage and fails as a pair. Image paths are
kept as written; ``resolve_image`` turns one into a file inside the dataset directory or refuses it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .errors import GmrError
from .prompt import text_problem

TASK_CATEGORIES = {
    "t2t": "single-modal", "i2i": "single-modal",
    "t2i": "cross-modal", "i2t": "cross-modal", "t2vd": "cross-modal",
    "t2it": "fused-modal", "it2t": "fused-modal", "it2i": "fused-modal", "it2it": "fused-modal",
}
DATASET_FILES = ("dataset.json", "queries.jsonl", "corpus.jsonl", "qrels.tsv", "candidates.trec")


class InputError(GmrError, ValueError):
    """The input itself is malformed: ``path`` (and ``line``, 1-based, when it is about one line)."""

    def __init__(self, path: str, message: str, line: int | None = None):
        self.path, self.line, self.message = path, line, message
        super().__init__(f"{path}{f':{line}' if line else ''}: {message}")


@dataclass
class Record:
    """One query or document: text and/or an image path relative to the dataset directory."""

    id: str
    text: str | None
    image: str | None
    line: int
    error: str | None = None  # the row is malformed (file:line: why): its pairs fail with this


@dataclass
class Dataset:
    root: str
    name: str
    task: str
    instruction: str | None
    queries: dict[str, Record]
    corpus: dict[str, Record]
    qrels: dict[str, dict[str, int]]
    # per query, (docid, first-stage score) in trec_eval's order: score descending, ties by docid
    # descending (trec_eval ignores the rank column; so do we)
    candidates: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    problems: list[InputError] = field(default_factory=list)  # malformed rows left out, file and line each

    @property
    def category(self) -> str:
        return TASK_CATEGORIES[self.task]

    def query_order(self) -> list[str]:
        """Queries with candidates, in queries.jsonl order."""
        return [q for q in self.queries if q in self.candidates]


def _lines(path: str, problems: list[InputError] | None = None):
    """Yields (line number, text) for each non-blank line of a UTF-8 text file. A byte-order mark
    at its start is dropped (Windows tools write one); a line that is not UTF-8 is malformed
    (raised, or listed in ``problems`` and skipped), not the end of the read."""
    try:
        f = open(path, encoding="utf-8-sig", errors="surrogateescape")
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    with f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            bad = not_utf8(raw)
            if bad is not None:
                _refuse(problems, InputError(path, bad, n))
                continue
            yield n, raw


def not_utf8(line: str) -> str | None:
    """For a line read with ``errors="surrogateescape"``: where its bytes stop being UTF-8 (each
    such byte reads as U+DC80-U+DCFF, which UTF-8 cannot encode). Two C-speed checks per line."""
    if line.isascii():
        return None
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not UTF-8 text (byte 0x{ord(line[e.start]) - 0xDC00:02x} at column {e.start + 1})"
    return None


def _refuse(problems: list[InputError] | None, error: InputError) -> None:
    """A malformed line: raised where there is no ``problems`` list (a strict read), else listed."""
    if problems is None:
        raise error
    problems.append(error)


def read_jsonl(path: str, problems: list[InputError] | None = None):
    """Yields (line number, object) for each non-blank line; a bad line is an InputError, raised,
    or listed in ``problems`` and skipped."""
    for n, raw in _lines(path, problems):
        try:
            obj = json.loads(raw.rstrip("\r\n"))  # columns counted on this line
        except json.JSONDecodeError as e:
            _refuse(problems, InputError(path, f"not valid JSON ({e.msg} at column {e.colno})", n))
            continue
        if not isinstance(obj, dict):
            _refuse(problems, InputError(path, f"expected a JSON object, got {type(obj).__name__}", n))
            continue
        yield n, obj


def _records(path: str, problems: list[InputError] | None = None) -> dict[str, Record]:
    """Queries or documents by id. With ``problems``, a malformed row whose id is usable stays as
    a Record with ``error`` (its pairs fail), as do both rows of a duplicate id; a row without a
    usable id is only listed."""
    out: dict[str, Record] = {}
    for n, obj in read_jsonl(path, problems):
        rid = obj.get("id")
        if not isinstance(rid, str) or not rid:
            _refuse(problems, InputError(path, f"'id' must be a non-empty string, got {rid!r}", n))
            continue
        if text_problem(rid) is not None:  # the outputs could not hold it (a lone surrogate)
            _refuse(problems, InputError(path, f"'id' {rid!r}: {text_problem(rid)}; ids are written to UTF-8 outputs", n))
            continue
        if any(c.isspace() for c in rid):
            _refuse(problems, InputError(path, f"id {rid!r} contains whitespace (it must fit a TREC run line)", n))
            continue
        text, image = obj.get("text"), obj.get("image")
        error = None
        if rid in out:
            error = InputError(path, f"duplicate id {rid!r} (first on line {out[rid].line})", n)
        elif text is not None and not isinstance(text, str):
            error = InputError(path, f"'text' must be a string, got {type(text).__name__}", n)
        elif image is not None and (not isinstance(image, str) or not image):
            error = InputError(path, f"'image' must be a relative path string, got {image!r}", n)
        elif text is None and image is None:
            error = InputError(path, f"{rid!r} has neither 'text' nor 'image'", n)
        if error is not None:
            _refuse(problems, error)
            out[rid] = Record(rid, None, None, out[rid].line if rid in out else n, str(error))
            continue
        out[rid] = Record(rid, text, image, n)
    return out


def _read_qrels(path: str, queries: dict, corpus: dict,
                problems: list[InputError] | None = None) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for n, raw in _lines(path, problems):
        parts = raw.rstrip("\r\n").split("\t") if "\t" in raw else raw.split()
        if len(parts) == 4:  # TREC qrels: qid iter docid rel
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            _refuse(problems, InputError(path, f"expected query_id<TAB>doc_id<TAB>relevance, got {len(parts)} fields",
                                         n))
            continue
        qid, docid, rel = (p.strip() for p in parts)
        try:
            value = int(rel)
        except ValueError:
            if n == 1 and not qrels:  # a header line
                continue
            _refuse(problems, InputError(path, f"relevance must be an integer, got {rel!r}", n))
            continue
        error = f"relevance must be >= 0, got {value}" if value < 0 else _unknown(qid, docid, queries, corpus)
        if not error and docid in qrels.get(qid, {}):
            error = f"duplicate judgement for ({qid!r}, {docid!r})"
        if error:
            _refuse(problems, InputError(path, error, n))
            continue
        qrels.setdefault(qid, {})[docid] = value
    return qrels


def _unknown(qid: str, docid: str, queries: dict | None, corpus: dict | None) -> str | None:
    """Why (qid, docid) names something not in queries.jsonl or corpus.jsonl (None: unchecked)."""
    if queries is not None and qid not in queries:
        return f"unknown query id {qid!r} (not in queries.jsonl)"
    if corpus is not None and docid not in corpus:
        return f"unknown document id {docid!r} (not in corpus.jsonl)"
    return None


def read_trec_run(path: str, queries: dict | None = None, corpus: dict | None = None,
                  problems: list[InputError] | None = None) -> dict[str, dict[str, float]]:
    """A TREC run (``qid Q0 docid rank score tag``) as {qid: {docid: score}}. With ``problems``,
    bad lines are listed and skipped, except a document missing from ``corpus``: that candidate
    stays (its pair fails when scored)."""
    run: dict[str, dict[str, float]] = {}
    for n, raw in _lines(path, problems):
        parts = raw.split()
        if len(parts) != 6:
            _refuse(problems, InputError(path, f"expected 'qid Q0 docid rank score tag', got {len(parts)} fields", n))
            continue
        qid, _, docid, rank, score, _ = parts
        try:
            int(rank)
            value = float(score)
        except ValueError:
            _refuse(problems, InputError(path, f"rank must be an integer and score a number, got {rank!r} {score!r}",
                                         n))
            continue
        # a candidate missing from the corpus stays when problems are listed: its pair fails instead
        error = "score is NaN" if value != value else _unknown(qid, docid, queries, None if problems is not None
                                                               else corpus)
        if not error and docid in run.get(qid, {}):
            error = f"duplicate candidate ({qid!r}, {docid!r})"
        if error:
            _refuse(problems, InputError(path, error, n))
            continue
        run.setdefault(qid, {})[docid] = value
    return run


def trec_order(docs: dict[str, float]) -> list[tuple[str, float]]:
    """trec_eval's ranking of one query's run: score descending, ties by docid descending."""
    return sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)


def load_dataset(root: str) -> Dataset:
    """Reads and checks one dataset directory (every file named in DATASET_FILES)."""
    meta_path = os.path.join(root, "dataset.json")
    if not os.path.isfile(meta_path):
        held = [f for f in DATASET_FILES[1:] if os.path.exists(os.path.join(root, f))]
        raise InputError(meta_path, "missing: every dataset directory needs a dataset.json "
                                    "({\"name\", \"task\", \"instruction\"})"
                                    + (f"; this one holds {', '.join(held)}" if held else ""))
    try:
        with open(meta_path, encoding="utf-8-sig") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(meta_path, f"not valid JSON ({e.msg})", e.lineno) from None
    except UnicodeDecodeError as e:
        raise InputError(meta_path, f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at byte {e.start + 1})") from None
    if not isinstance(meta, dict):
        raise InputError(meta_path, "expected a JSON object")
    name = meta.get("name", os.path.basename(os.path.normpath(root)))
    task = meta.get("task")
    if task not in TASK_CATEGORIES:
        raise InputError(meta_path, f"'task' must be one of {', '.join(TASK_CATEGORIES)}, got {task!r}")
    instruction = meta.get("instruction")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise InputError(meta_path, f"'name' must be a plain directory-safe string, got {name!r}")
    if instruction is not None and not isinstance(instruction, str):
        raise InputError(meta_path, f"'instruction' must be a string, got {type(instruction).__name__}")
    problems: list[InputError] = []  # malformed rows: each fails itself, the rest of the dataset stands
    queries = _records(os.path.join(root, "queries.jsonl"), problems)
    corpus = _records(os.path.join(root, "corpus.jsonl"), problems)
    qrels = _read_qrels(os.path.join(root, "qrels.tsv"), queries, corpus, problems)
    run = read_trec_run(os.path.join(root, "candidates.trec"), queries, corpus, problems)
    return Dataset(root, name, task, instruction, queries, corpus, qrels, {q: trec_order(d) for q, d in run.items()},
                   problems)


def find_datasets(path: str, names: list[str] | None = None) -> list[str]:
    """Dataset directories under ``path``: itself if it holds a dataset.json, else its
    subdirectories in name order. A subdirectory that holds dataset files but no dataset.json is
    listed too (``load_dataset`` then names what it lacks); a name in ``names`` that is not there
    is an error."""
    if not os.path.isdir(path):
        raise InputError(path, "not a directory")
    if os.path.isfile(os.path.join(path, "dataset.json")):
        found = {os.path.basename(os.path.normpath(path)): path}
    else:
        found = {}
        for entry in sorted(os.listdir(path)):
            sub = os.path.join(path, entry)
            if not os.path.isdir(sub):
                continue
            if any(os.path.exists(os.path.join(sub, f)) for f in DATASET_FILES):
                found[entry] = sub
        if not found:
            raise InputError(path, "no dataset.json here or in any subdirectory: not a dataset or a suite")
    if names:
        unknown = [n for n in names if n not in found]
        if unknown:
            raise InputError(path, f"no dataset named {', '.join(unknown)} (have: {', '.join(found)})")
        return [found[n] for n in names]
    return list(found.values())


class PathRefused(GmrError, ValueError):
    """An image path that would leave its dataset directory."""


def resolve_image(root: str, relative: str) -> str:
    """The file an image path names, which must lie inside ``root``: absolute paths, ``..`` and
    symlinks that lead out of the directory are refused (PathRefused). A missing file is not
    checked here; reading it reports that."""
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or (len(relative) > 1 and relative[1] == ":"):
        raise PathRefused(f"image path {relative!r} is absolute; paths must be relative to the dataset directory")
    parts = relative.replace("\\", "/").split("/")
    if ".." in parts:
        raise PathRefused(f"image path {relative!r} contains '..'; paths must stay inside the dataset directory")
    base = os.path.realpath(root)
    target = os.path.realpath(os.path.join(base, relative))
    if os.path.commonpath([base, target]) != base:
        raise PathRefused(f"image path {relative!r} leads outside the dataset directory (symlink to {target!r})")
    return target
