"""The fp32 reference's scores, kept per checkpoint and pair across exports.

The reference is the slow part of an export: at GMR-7B's full depth on a 2-core CPU the streamed
reference takes 48 of the 74 minutes (92 pairs). It is a function of the checkpoint (weights,
config, tokenizer, preprocessing, gmr.json), of the pair and instruction, and of the code that
computes it, so an export that asks for a pair it was asked for before, on the same checkpoint
with the same code, gets the score stored then instead of recomputing it: re-exporting with
another ``--dtype`` list, another int8 keep-list or a larger validation set only computes the
pairs it has not seen. Variants are still validated against the reference every time; only the
reference's own scores are reused.

One JSON file per checkpoint identity under the cache directory (``default_directory``); pairs
are keyed by a digest of their content (texts, image bytes, shapes) and the instruction. The
identity covers the weights' sha256 (which the manifest records anyway), every other file of the
checkpoint directory, the source of the modules the reference runs (``CODE``) and the torch and
transformers versions: change any and it is a different file. A file that cannot be read is
reported and recomputed, never trusted; files are replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import tempfile
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("gmr_fast.export")

FORMAT = 1
_ROOT = pathlib.Path(__file__).resolve().parents[1]
# what the reference's scores are computed by: HF's model, or (streamed) HF's vision tower and
# positions with the engine's decoder modules, and the family facts both read
CODE = ("export/reference.py", "export/checkpoint.py", "gmr_fast/graphs", "gmr_fast/families",
        "gmr_fast/gmr_config.py")


def default_directory() -> pathlib.Path:
    """``$GMR_FAST_CACHE_DIR/reference``, else ``$XDG_CACHE_HOME/gmr_fast/reference``, else
    ``~/.cache/gmr_fast/reference``."""
    if os.environ.get("GMR_FAST_CACHE_DIR"):
        return pathlib.Path(os.environ["GMR_FAST_CACHE_DIR"]) / "reference"
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "gmr_fast" / "reference"


def _code_digest() -> str:
    h = hashlib.sha256()
    for entry in CODE:
        path = _ROOT / entry
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(f.relative_to(_ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def checkpoint_identity(checkpoint: pathlib.Path, weights_sha256: str) -> dict:
    """What the reference's scores depend on besides the pair; its digest names the cache file."""
    import torch
    import transformers

    files = hashlib.sha256()
    for f in sorted(p for p in checkpoint.iterdir() if p.is_file() and p.suffix != ".safetensors"):
        files.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return {"format": FORMAT, "weights_sha256": weights_sha256, "checkpoint_files_sha256": files.hexdigest(),
            "code_sha256": _code_digest(), "torch": torch.__version__, "transformers": transformers.__version__}


def _update(h, value: Any) -> None:
    if isinstance(value, str):
        h.update(b"s" + value.encode() + b"\0")
    elif isinstance(value, np.ndarray):
        h.update(f"a{value.dtype.str}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        h.update(b"d")
        for k in sorted(value):
            h.update(k.encode() + b"=")
            _update(h, value[k])
        h.update(b"\0")
    else:  # a path or an image object: what it would read may change under the same name
        raise TypeError(f"no content digest for a {type(value).__name__}")


def pair_key(instruction: str | None, query: Any, document: Any) -> str | None:
    """The digest of one scored input, or None where its content cannot be digested (not cached)."""
    h = hashlib.sha256()
    try:
        for part in (instruction or "", query, document):
            _update(h, part)
    except TypeError:
        return None
    return h.hexdigest()


class ReferenceCache:
    def __init__(self, directory: os.PathLike, identity: dict):
        self.identity = identity
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
        self.path = pathlib.Path(directory) / f"{digest}.json"
        self.scores: dict[str, float] = {}
        if self.path.exists():
            try:
                doc = json.loads(self.path.read_text())
                if doc.get("identity") != identity:
                    raise ValueError("it was written for another checkpoint identity")
                self.scores = {str(k): float(v) for k, v in doc["scores"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                log.warning("reference cache %s is unreadable (%s): its scores are recomputed", self.path, e)
                self.scores = {}

    def score(self, pairs: Sequence[tuple[Any, Any]], instruction: str | None, compute) -> tuple[np.ndarray, int]:
        """The reference's scores of ``pairs``: stored ones, and ``compute(missing_pairs)`` for the
        rest (then stored). Returns (scores, how many came from the cache)."""
        keys = [pair_key(instruction, q, d) for q, d in pairs]
        missing = [i for i, k in enumerate(keys) if k is None or k not in self.scores]
        fresh = {}
        if missing:
            computed = np.asarray(compute([pairs[i] for i in missing]), np.float64)
            fresh = dict(zip(missing, computed.tolist()))
            new = {keys[i]: s for i, s in fresh.items() if keys[i] is not None}
            if new:
                self.scores.update(new)
                self._save()
        out = np.array([fresh[i] if i in fresh else self.scores[k] for i, k in enumerate(keys)], np.float64)
        return out, len(pairs) - len(missing)

    def _save(self) -> None:
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump({"identity": self.identity, "scores": self.scores}, f)
            os.replace(tmp, self.path)
        except OSError as e:  # a cache that cannot be written costs time next export, nothing else
            log.warning("could not write the reference cache %s (%s)", self.path, e)
            if tmp is not None:
                pathlib.Path(tmp).unlink(missing_ok=True)
