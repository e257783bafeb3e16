"""Training groups: one JSONL line each, ``{"instruction"?, "query", "positive", "negatives": [...]}``,
every side a string or ``{"text", "image"}`` (image paths relative to the data file).

A malformed line (text UTF-8 cannot encode included: the tokenizer refuses it) is skipped with
a warning naming it; the run stops when more than
``max_bad_fraction`` of the lines are malformed. A group naming an image file that does not
exist is an error naming the group (a missing image is data loss, not noise). Negatives beyond
``--negatives`` are sampled per (seed, epoch, group): half hard from the head of the list (the
order the miner wrote), half at random from the rest.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np

from gmr_fast.errors import GmrError
from gmr_fast.prompt import Item, text_problem
from gmr_fast.suite import not_utf8

log = logging.getLogger("train")


class TrainDataError(GmrError, ValueError):
    pass


@dataclass
class Group:
    line: int
    instruction: str | None
    query: Item
    positive: Item
    negatives: list[Item]


def _side(value, root: str, where: str) -> Item:
    item = None
    if isinstance(value, str):
        item = Item(text=value)
    elif isinstance(value, dict) and value and set(value) <= {"text", "image"}:
        text, image = value.get("text"), value.get("image")
        if (text is None or isinstance(text, str)) and (image is None or (isinstance(image, str) and image)):
            item = Item(text=text or "", image=None if image is None else os.path.join(root, image))
    if item is None:
        raise ValueError(f"{where} must be a string or {{\"text\", \"image\"}}")
    if text_problem(item.text) is not None:  # the tokenizer would stop the run at this group's first batch
        raise ValueError(f"{where} text: {text_problem(item.text)}")
    return item


def load_groups(path: str, max_bad_fraction: float = 0.05) -> list[Group]:
    root = os.path.dirname(os.path.abspath(path))
    groups, bad, total = [], [], 0
    try:
        f = open(path, encoding="utf-8-sig", errors="surrogateescape")  # a BOM dropped; bytes not UTF-8: below
    except FileNotFoundError:
        raise TrainDataError(f"{path}: training data not found") from None
    with f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            total += 1
            try:
                if not_utf8(raw) is not None:
                    raise ValueError(not_utf8(raw))
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise ValueError("expected a JSON object")
                for key in ("query", "positive"):
                    if key not in obj:
                        raise ValueError(f"missing '{key}'")
                negatives = obj.get("negatives", [])
                if not isinstance(negatives, list):
                    raise ValueError("'negatives' must be a list")
                instruction = obj.get("instruction")
                if instruction is not None and not isinstance(instruction, str):
                    raise ValueError("'instruction' must be a string")
                if instruction is not None and text_problem(instruction) is not None:
                    raise ValueError(f"'instruction': {text_problem(instruction)}")
                group = Group(n, instruction, _side(obj["query"], root, "'query'"), _side(obj["positive"], root, "'positive'"),
                              [_side(x, root, f"negative {i}") for i, x in enumerate(negatives)])
                missing = [x.image for x in (group.query, group.positive, *group.negatives)
                           if x.image is not None and not os.path.isfile(x.image)]
                if missing:  # a missing file fails its group only, counted against the bad fraction like the rest
                    raise ValueError(f"image {missing[0]!r} does not exist")
            except (json.JSONDecodeError, ValueError) as e:
                bad.append(n)
                log.warning("%s:%d: malformed group skipped (%s)", path, n, e)
                continue
            groups.append(group)
    if total and len(bad) / total > max_bad_fraction:
        raise TrainDataError(f"{path}: {len(bad)} of {total} groups are malformed (lines {bad[:10]}...), more than the "
                             f"allowed fraction {max_bad_fraction}; fix the data or raise --max-bad-fraction")
    if bad:
        log.warning("%s: skipped %d malformed group(s) of %d", path, len(bad), total)
    if not groups:
        raise TrainDataError(f"{path}: no usable training groups")
    return groups


def sample_negatives(group: Group, n: int, seed: int, epoch: int, index: int) -> list[Item]:
    """``n`` negatives of ``group``: all when it has at most ``n``, else half hard (head of the
    list) and half random from the rest, drawn from (seed, epoch, index) alone so every process
    of a distributed run draws the same ones."""
    negs = group.negatives
    if len(negs) <= n:
        return list(negs)
    hard = n // 2
    rng = np.random.default_rng([seed, epoch, index])
    rest = rng.choice(np.arange(hard, len(negs)), size=n - hard, replace=False)
    return negs[:hard] + [negs[i] for i in sorted(rest)]
