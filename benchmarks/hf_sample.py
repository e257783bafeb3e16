"""How far HF's rate on ``mrb_workload.py``'s sample is from its rate on every pair, per task.

``mrb_workload.py`` times HF on a sample of each image task's pairs (HF fp32 on every it2it pair
takes 10-20 minutes a task). HF sorts a call's pairs by length and pads each batch to its
longest, so on a sample of 8 it pads more than on a query's 50 candidates, and its per-pair rate
reads low. This measures by how much, cheaply: HF in its fastest CPU form (bf16, sdpa,
``logits_to_keep=1``, length-sorted, with the allocator setting gmr_fast's torch backend makes)
on ``mrb_workload``'s sample of 8 (from 2 queries x 50) and on every pair of one query's 50,
the sample again after that, and gmr_fast's default engine on the same 50, each in its own
process and warmed up on as many other pairs as it times.

    python benchmarks/hf_sample.py --tasks t2i,i2t,it2it --out benchmarks/results/hf_sample_cpu.json

Uses ``mrb_workload.py``'s checkpoint and engine under ``--work`` (run that first).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import in_child, machine, write  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="gmr-3b:6:8")
    p.add_argument("--tasks", default="t2i,i2t,it2it")
    p.add_argument("--sample", type=int, default=8, help="mrb_workload.py's --hf-sample")
    p.add_argument("--candidates", type=int, default=50)
    p.add_argument("--work", default="/tmp/gmr_bench")
    p.add_argument("--out", default="benchmarks/results/hf_sample_cpu.json")
    a = p.parse_args()
    shape, layers, vlayers = a.shape.split(":")
    ckpt = pathlib.Path(a.work) / f"{shape}-L{layers}-V{vlayers}"
    engine = pathlib.Path(a.work) / f"{shape}-L{layers}-V{vlayers}-engine"
    for path in (ckpt, engine):
        if not path.is_dir():
            sys.exit(f"{path} is missing: run benchmarks/mrb_workload.py --shape {a.shape} --work {a.work} first")
    doc = {"machine": machine(), "shape": a.shape, "sample": a.sample, "candidates": a.candidates, "tasks": {}}
    for task in a.tasks.split(","):
        hf = ("mrb_workload:child_hf", str(ckpt), "bf16", task)
        rows = {"hf_bf16_sample": in_child(*hf, 2, a.candidates, a.sample, 0, True),
                "hf_bf16_every_pair": in_child(*hf, 1, a.candidates, a.candidates, 0, True),
                "gmr_every_pair": in_child("mrb_workload:child_gmr", str(engine), task, 1, a.candidates, True,
                                           a.candidates, None, "auto", None, 0),
                "hf_bf16_sample_again": in_child(*hf, 2, a.candidates, a.sample, 0, True)}
        for row in rows.values():
            row.pop("sample_scores", None)
        sample_rate = (rows["hf_bf16_sample"]["pairs_per_s"] + rows["hf_bf16_sample_again"]["pairs_per_s"]) / 2
        every = rows["hf_bf16_every_pair"]["pairs_per_s"]
        rows["hf_every_pair_over_sample"] = every / sample_rate
        rows["gmr_vs_hf_sample"] = rows["gmr_every_pair"]["pairs_per_s"] / sample_rate
        rows["gmr_vs_hf_every_pair"] = rows["gmr_every_pair"]["pairs_per_s"] / every
        doc["tasks"][task] = rows
        print(task, {k: round(v, 3) for k, v in rows.items() if isinstance(v, float)},
              {k: (round(v["pairs_per_s"], 3), round(v["decoder_tokens_per_pair"], 1))
               for k, v in rows.items() if isinstance(v, dict)}, flush=True)
        write(a.out, doc)


if __name__ == "__main__":
    main()
