"""MRB-mini: a generated multimodal reranking suite, in the score CLI's format, with a train split.

    python -m train.mrb_mini --out DIR [--seed 0] [--test-queries 40] [--train-groups 300]

Images are drawn with Pillow: ``count`` shapes of one colour on a light background (colours x
shapes x counts), captions say what is drawn ("two red circles"). Relevance is graded: 2 when
colour, shape and count match, 1 when colour and shape match. Datasets: t2t (caption -> description), t2i (caption -> image), i2t
(image -> caption), it2it (image + caption -> image + caption). Each test query gets 20
candidates (its 6 relevant documents, 6 hard negatives sharing the colour or the shape, random
ones) with a deliberately noisy first-stage score, so the first stage's nDCG@10 is mediocre and
a reranker that reads the content can beat it. ``DIR/train.jsonl`` holds training groups
(query, positive, hard-first negatives) drawn from separate images and phrasings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (235, 205, 20),
           "purple": (140, 40, 170), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
COUNTS = {1: "one", 2: "two", 3: "three"}
ATTRS = list(itertools.product(COLOURS, SHAPES, COUNTS))
TASKS = {"t2t": "Match the caption to the sentence.", "t2i": "Match the caption to the image.",
         "i2t": "Match the image to the caption.", "it2it": "Match the captioned images."}
CAPTION_FORMS = ("{n} {c} {s}", "{n} {c} {s} on a plain background", "a picture of {n} {c} {s}", "{n} {s}, all {c}")
SENTENCE_FORMS = ("There are {n} {c} {s} in this picture.", "The image shows {n} {s}; each one is {c}.",
                  "You can see {n} {c} {s} here.", "A drawing of {n} {c} {s}.")
SIZE = 84
CANDIDATES = 20


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def caption(attr, form: str) -> str:
    colour, shape, count = attr
    return form.format(n=COUNTS[count], c=colour, s=_plural(shape, count))


def draw(attr, rng: np.random.Generator) -> Image.Image:
    colour, shape, count = attr
    bg = tuple(int(v) for v in rng.integers(225, 256, 3))
    img = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(img)
    fill = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLOURS[colour])
    boxes = []
    for _ in range(count):
        for _attempt in range(50):  # non-overlapping placement
            r = int(rng.integers(8, 13))
            x, y = (int(v) for v in rng.integers(r + 2, SIZE - r - 2, 2))
            if all(abs(x - bx) > r + br + 2 or abs(y - by) > r + br + 2 for bx, by, br in boxes):
                break
        boxes.append((x, y, r))
        if shape == "circle":
            d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif shape == "square":
            d.rectangle([x - r, y - r, x + r, y + r], fill=fill)
        else:
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return img


def _hard(attr, rng) -> tuple:
    """An attribute triple sharing exactly two of ``attr``'s three."""
    colour, shape, count = attr
    which = int(rng.integers(0, 3))
    if which == 0:
        colour = rng.choice([c for c in COLOURS if c != colour])
    elif which == 1:
        shape = rng.choice([s for s in SHAPES if s != shape])
    else:
        count = int(rng.choice([n for n in COUNTS if n != count]))
    return (str(colour), str(shape), int(count))


def _side(task_side: str, attr, image_path: str | None, text: str):
    if task_side == "t":
        return {"text": text}
    if task_side == "i":
        return {"image": image_path}
    return {"image": image_path, "text": text}


def _sides(task: str) -> tuple[str, str]:
    q, d = task.split("2")
    return q, d


def _related(attr) -> tuple[list, list]:
    """(same colour and shape, other count) and (one of colour / shape differs) attribute triples."""
    colour, shape, count = attr
    partial = [(colour, shape, n) for n in COUNTS if n != count]
    hard = [a for a in ATTRS if (a[0] == colour) != (a[1] == shape)]
    return partial, hard


def make_dataset(root: str, task: str, n_queries: int, rng: np.random.Generator) -> None:
    path = os.path.join(root, task)
    os.makedirs(os.path.join(path, "images"), exist_ok=True)
    qside, dside = _sides(task)
    # corpus: every attribute triple twice (two drawings / phrasings): 108 documents
    corpus, by_attr = [], {}
    for k, attr in enumerate(ATTRS * 2):
        did = f"d{k}"
        image = None
        if dside != "t":
            image = f"images/{did}.png"
            draw(attr, rng).save(os.path.join(path, image))
        forms = SENTENCE_FORMS if task == "t2t" else CAPTION_FORMS
        corpus.append({"id": did, **_side(dside, attr, image, caption(attr, forms[int(rng.integers(len(forms)))]))})
        by_attr.setdefault(attr, []).append(did)
    queries, qrels, lines = [], [], []
    for i in range(n_queries):
        attr = ATTRS[int(rng.integers(len(ATTRS)))]
        qid = f"q{i}"
        image = None
        if qside != "t":
            image = f"images/{qid}.png"
            draw(attr, rng).save(os.path.join(path, image))
        queries.append({"id": qid, **_side(qside, attr, image, caption(attr, CAPTION_FORMS[int(rng.integers(len(CAPTION_FORMS)))]))})
        # graded relevance: 2 = colour, shape and count match; 1 = colour and shape match
        exact = by_attr[attr]
        partial_attrs, hard_attrs = _related(attr)
        partial = [d for a in partial_attrs for d in by_attr[a]]
        qrels += [(qid, d, 2) for d in exact] + [(qid, d, 1) for d in partial]
        hard_pool = [d for a in hard_attrs for d in by_attr[a]]
        hard = [str(x) for x in rng.choice(hard_pool, 6, replace=False)]
        taken = set(exact) | set(partial) | set(hard)
        pool = [d["id"] for d in corpus if d["id"] not in taken]
        rand = [str(x) for x in rng.choice(pool, CANDIDATES - len(taken), replace=False)]
        # the first stage: a weak edge for relevance (and a smaller one for hard negatives), lots of noise
        edge = {**{d: 0.6 for d in exact}, **{d: 0.4 for d in partial}, **{d: 0.25 for d in hard}}
        scored = [(d, edge.get(d, 0.0) + rng.normal(0, 1.0)) for d in [*exact, *partial, *hard, *rand]]
        scored.sort(key=lambda x: -x[1])
        lines += [f"{qid} Q0 {d} {r} {s:.4f} first-stage\n" for r, (d, s) in enumerate(scored, 1)]
    with open(os.path.join(path, "dataset.json"), "w") as f:
        json.dump({"name": task, "task": task, "instruction": TASKS[task]}, f, indent=2)
    for name, rows in (("queries.jsonl", queries), ("corpus.jsonl", corpus)):
        with open(os.path.join(path, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(path, "qrels.tsv"), "w") as f:
        f.write("query_id\tdoc_id\trelevance\n")
        f.writelines(f"{q}\t{d}\t{r}\n" for q, d, r in qrels)
    with open(os.path.join(path, "candidates.trec"), "w") as f:
        f.writelines(lines)


def make_train(root: str, n_groups: int, negatives: int, rng: np.random.Generator) -> str:
    """Groups over all four tasks: hard negatives first (two attributes shared), then random."""
    img_dir = os.path.join(root, "train_images")
    os.makedirs(img_dir, exist_ok=True)
    counter = itertools.count()

    def image(attr) -> str:
        name = f"train_images/{next(counter)}.png"
        draw(attr, rng).save(os.path.join(root, name))
        return name

    def item(side: str, attr, forms) -> dict:
        return _side(side, attr, image(attr) if side != "t" else None, caption(attr, forms[int(rng.integers(len(forms)))]))

    path = os.path.join(root, "train.jsonl")
    with open(path, "w") as f:
        for g in range(n_groups):
            task = list(TASKS)[g % len(TASKS)]
            qside, dside = _sides(task)
            forms = SENTENCE_FORMS if task == "t2t" else CAPTION_FORMS
            attr = ATTRS[int(rng.integers(len(ATTRS)))]
            n_hard = negatives // 2
            neg_attrs = [_hard(attr, rng) for _ in range(n_hard)]
            while len(neg_attrs) < negatives:
                other = ATTRS[int(rng.integers(len(ATTRS)))]
                if other != attr:
                    neg_attrs.append(other)
            group = {"instruction": TASKS[task], "query": item(qside, attr, CAPTION_FORMS),
                     "positive": item(dside, attr, forms), "negatives": [item(dside, a, forms) for a in neg_attrs]}
            f.write(json.dumps(group) + "\n")
    return path


def generate(out: str, seed: int = 0, test_queries: int = 40, train_groups: int = 300, negatives: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    test = os.path.join(out, "test")
    for task in TASKS:
        make_dataset(test, task, test_queries, rng)
    train = make_train(out, train_groups, negatives, rng)
    return {"test": test, "train": train}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.mrb_mini", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-queries", type=int, default=40)
    p.add_argument("--train-groups", type=int, default=300)
    p.add_argument("--negatives", type=int, default=7)
    a = p.parse_args(argv)
    paths = generate(a.out, a.seed, a.test_queries, a.train_groups, a.negatives)
    print(json.dumps(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
