"""``python -m train``: fine-tune a GMR checkpoint on groups (1 query, 1 positive, N negatives).

    python -m train --base-model DIR --data train.jsonl --out CKPT [--objective sft|cl|url]
        [--url-weight sft|cl|base|base_tau] [--url-direction sft|cl] [--tau 0.1] [--negatives 16]
        [--lora-r 16 | --full] [--lr 1e-4] [--epochs 1] [--batch-size 4] [--grad-accum 1]
        [--max-length 3200] [--bf16] [--gradient-checkpointing] [--seed 0] [--resume]

Runs as one process or under ``torchrun`` (DDP; gloo on CPU, nccl on GPU). An optimizer step
consumes ``batch_size x grad_accum x world_size`` groups of the epoch's seeded permutation;
each micro-batch's loss is the mean over its groups, so N processes with accumulation A take
the same steps as one process with accumulation N x A. Progress goes to stderr,
``metrics.jsonl`` (step, loss, lr, examples/s) into --out, the training state into
``--out/train_state`` every ``--save-every`` steps (``--resume`` continues from it), and the
final GMR checkpoint (LoRA merged, gmr.json with provenance) into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch

from gmr_fast.errors import GmrError, ImageError
from gmr_fast.gmr_config import GmrConfig
from gmr_fast.options import add_arguments, fingerprint, from_args, option
from gmr_fast.progress import Progress

from .data import TrainDataError, load_groups, sample_negatives
from .features import FeatureBuilder
from .model import RerankHead, load_model, make_trainable, save_checkpoint
from .objectives import DIRECTIONS, WEIGHTS, objective_loss

log = logging.getLogger("train")
STATE_DIR = "train_state"


@dataclass
class TrainOptions:
    """Every setting of a training run. The CLI's flags come from these fields; the ones marked
    ``determinism`` define the run (a resumed run must have the same ones)."""

    base_model: str = option(None, "GMR / Qwen2(.5)-VL checkpoint directory", determinism=True, metavar="DIR")
    data: str = option(None, "training groups, JSONL", determinism=True, metavar="FILE")
    out: str = option(None, "checkpoint directory to write", metavar="DIR")
    objective: str = option("sft", "sft, cl or url; or align: contrastive alignment of a vision tower trained from "
                                   "scratch with the word embeddings of the images' captions, before reranking is "
                                   "learned", determinism=True, choices=("sft", "cl", "url", "align"))
    url_weight: str = option("sft", "URL weight source", determinism=True, choices=WEIGHTS)
    url_direction: str = option("sft", "URL direction source", determinism=True, choices=DIRECTIONS)
    tau: float = option(0.1, "tau-mask threshold of --url-weight base_tau", determinism=True)
    negatives: int = option(16, "negatives per group (sampled when a group has more)", determinism=True)
    lora_r: int = option(16, "LoRA rank", determinism=True)
    lora_alpha: int | None = option(None, "LoRA alpha (default 2 x r)", determinism=True)
    full: bool = option(False, "full fine-tuning instead of LoRA", determinism=True)
    train_vision: bool = option(False, "also train the vision tower (frozen by default)", determinism=True)
    freeze_embeddings: bool = option(False, "with --full: keep the token embedding and LM head frozen "
                                            "(vocabulary-sized)", determinism=True)
    freeze_lm_head: bool = option(False, "with --full: keep the LM head frozen", determinism=True)
    lr: float = option(1e-4, "peak learning rate", determinism=True)
    weight_decay: float = option(0.0, "AdamW weight decay", determinism=True)
    warmup_ratio: float = option(0.03, "fraction of the steps spent warming up", determinism=True)
    lr_schedule: str = option("linear", "after warm-up: linear decay to 0, or constant", determinism=True,
                              choices=("linear", "constant"))
    max_grad_norm: float = option(1.0, "gradient clipping (0: off)", determinism=True)
    epochs: float = option(1.0, "passes over the groups", determinism=True)
    max_steps: int | None = option(None, "stop after this many optimizer steps (the schedule still spans --epochs)")
    batch_size: int = option(4, "groups per micro-batch per process", determinism=True)
    grad_accum: int = option(1, "micro-batches per optimizer step", determinism=True)
    max_length: int | None = option(None, "prompt length cap (default: the checkpoint's gmr.json)", determinism=True)
    bf16: bool = option(False, "bf16 autocast (fp32 master weights)", determinism=True)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass")
    fsdp: bool = option(False, "under torchrun: shard parameters, gradients and optimizer state (FSDP2, one unit per "
                               "decoder layer) instead of replicating them (DDP)", determinism=True)
    seed: int = option(0, "seed of the sampling, the data order and any random init", determinism=True)
    save_every: int = option(200, "save the training state every N steps")
    log_every: int = option(10, "metrics.jsonl every N steps")
    max_bad_fraction: float = option(0.05, "stop if more of the groups are malformed")
    threads: int | None = option(None, "torch intra-op threads")
    resume: bool = option(False, "continue from --out/train_state")
    quiet: bool = option(False, "no progress lines")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, TrainOptions)
    return p


def check_args(args: argparse.Namespace) -> list[str]:
    """What is wrong with the numbers given, each naming its flag: before any weight loads, so a
    typo is an exit code 2 with a message, not a traceback later (a zero batch divided by) or a
    run that trains on nothing (no epochs, no negatives) and writes a checkpoint all the same."""
    problems = []

    def need(ok: bool, flag: str, what: str) -> None:
        if not ok:
            problems.append(f"--{flag} {getattr(args, flag.replace('-', '_'))}: {what}")
    need(args.batch_size >= 1, "batch-size", "expected >= 1")
    need(args.grad_accum >= 1, "grad-accum", "expected >= 1")
    need(args.negatives >= 1, "negatives", "expected >= 1 (a group is a query, its positive and negatives)")
    need(math.isfinite(args.lr) and args.lr > 0, "lr", "expected > 0")
    need(math.isfinite(args.weight_decay) and args.weight_decay >= 0, "weight-decay", "expected >= 0")
    need(0 <= args.warmup_ratio < 1, "warmup-ratio", "expected a fraction in [0, 1)")
    need(math.isfinite(args.max_grad_norm) and args.max_grad_norm >= 0, "max-grad-norm", "expected >= 0 (0: off)")
    need(math.isfinite(args.epochs) and args.epochs > 0, "epochs", "expected > 0")
    need(args.max_steps is None or args.max_steps >= 1, "max-steps", "expected >= 1")
    need(args.full or args.lora_r >= 1, "lora-r", "expected >= 1")
    need(args.lora_alpha is None or args.lora_alpha > 0, "lora-alpha", "expected > 0")
    need(0 <= args.tau <= 1, "tau", "expected a probability in [0, 1]")
    need(args.max_length is None or args.max_length >= 1, "max-length", "expected >= 1")
    need(args.save_every >= 1, "save-every", "expected >= 1")
    need(args.log_every >= 1, "log-every", "expected >= 1")
    need(0 <= args.max_bad_fraction <= 1, "max-bad-fraction", "expected a fraction in [0, 1]")
    need(args.threads is None or args.threads >= 1, "threads", "expected >= 1")
    return problems


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Trainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
            else torch.device("cpu")
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)

        self.gmr = GmrConfig.load(args.base_model)
        if args.max_length:
            self.gmr.max_length = args.max_length
        self.groups = load_groups(args.data, args.max_bad_fraction)
        self.skipped: set[int] = set()  # groups with an image that does not decode (found when first used)
        per_step = args.batch_size * args.grad_accum * self.world
        self.steps_per_epoch = len(self.groups) // per_step
        if self.steps_per_epoch == 0:
            raise TrainDataError(f"{args.data}: {len(self.groups)} groups are fewer than one optimizer step "
                                 f"({args.batch_size} x {args.grad_accum} x {self.world} processes)")
        self.total_steps = max(1, math.ceil(args.epochs * self.steps_per_epoch))

        model = load_model(args.base_model)
        if args.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.trainable, self.hf_model = make_trainable(model, full=args.full, lora_r=args.lora_r,
                                                       lora_alpha=args.lora_alpha, train_vision=args.train_vision,
                                                       freeze_embeddings=args.freeze_embeddings,
                                                       freeze_lm_head=args.freeze_lm_head)
        if args.gradient_checkpointing and not args.full:  # frozen embeddings: checkpointed blocks need grad inputs
            self.hf_model.enable_input_require_grads()
        self.features = FeatureBuilder(args.base_model, self.gmr)
        head = RerankHead(self.trainable, self.hf_model, self.features.prompts.yes_id, self.features.prompts.no_id)
        head.to(self.device)
        self.head = head
        if args.fsdp:
            if self.world < 2:
                raise GmrError("--fsdp shards over processes: run it under torchrun --nproc_per_node=N (N >= 2)")
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world,))
            for layer in self.hf_model.model.language_model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(head, mesh=mesh)
            self.module = head
        elif self.world > 1:
            self.module = torch.nn.parallel.DistributedDataParallel(
                head, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=args.train_vision)
        else:
            self.module = head
        self.params = [p for p in head.parameters() if p.requires_grad]
        self.named = {n: p for n, p in head.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=args.weight_decay, foreach=True)
        warmup = int(args.warmup_ratio * self.total_steps)

        def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0 (or constant)
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if args.lr_schedule == "constant":
                return 1.0
            return max(0.0, (self.total_steps - step) / max(1, self.total_steps - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.step = 0
        self.fingerprint = fingerprint(from_args(TrainOptions, args))
        self.fingerprint["world_size"] = self.world
        self.fingerprint["data_sha256"] = _sha256(args.data)

    # ------------------------------------------------------------------ state
    @property
    def state_dir(self) -> str:
        return os.path.join(self.args.out, STATE_DIR)

    def _full_params(self) -> dict:
        """Every parameter of the head, whole, on process 0 (a collective under FSDP)."""
        if not self.args.fsdp:
            return {n: p.detach().cpu() for n, p in self.head.named_parameters()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.head, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_state(self) -> None:
        if self.args.fsdp:  # every process takes part in gathering the shards
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            full = self._full_params()
            optimizer = get_optimizer_state_dict(self.head, self.optimizer,
                                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            params = {n: full[n] for n in self.named} if self.rank == 0 else {}
        else:
            params = {n: p.detach().cpu() for n, p in self.named.items()}
            optimizer = self.optimizer.state_dict()
        skipped = set(self.skipped)  # each process finds the groups it uses: the union is the run's
        if self.world > 1:
            found: list = [None] * self.world
            torch.distributed.all_gather_object(found, sorted(self.skipped))
            skipped = set().union(*found)
        if self.rank != 0:
            return
        os.makedirs(self.state_dir, exist_ok=True)
        state = {"step": self.step, "fingerprint": self.fingerprint, "params": params,
                 "optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "skipped": sorted(skipped)}
        tmp = os.path.join(self.state_dir, f"state.pt.tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(self.state_dir, "state.pt"))

    def load_state(self) -> None:
        path = os.path.join(self.state_dir, "state.pt")
        if not os.path.exists(path):
            raise GmrError(f"--resume: no training state in {self.state_dir}")
        state = torch.load(path, map_location="cpu", weights_only=False)
        diff = [k for k in self.fingerprint if state["fingerprint"].get(k) != self.fingerprint[k]]
        if diff:
            raise GmrError(f"--resume: {self.state_dir} belongs to a run with different "
                           + ", ".join(f"{k} ({state['fingerprint'].get(k)!r} then, {self.fingerprint[k]!r} now)" for k in diff))
        if self.args.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.head, state["params"], options=options)
            set_optimizer_state_dict(self.head, self.optimizer, state["optimizer"], options=options)
        else:
            with torch.no_grad():
                for n, p in self.named.items():
                    p.copy_(state["params"][n])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        # groups found undecodable before: still skipped, not decoded or warned about again, and
        # counted against --max-bad-fraction over the whole run
        self.skipped = set(state.get("skipped", ()))
        if self.skipped:
            log.info("--resume: %d group(s) skipped earlier in this run (lines %s)", len(self.skipped),
                     sorted(self.groups[g].line for g in self.skipped)[:10])

    # ------------------------------------------------------------------ steps
    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches (group indices) for optimizer step ``step``."""
        a = self.args
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(len(self.groups), generator=torch.Generator().manual_seed(a.seed * 100003 + epoch)).tolist()
        per_step = a.batch_size * a.grad_accum * self.world
        chunk = perm[k * per_step:(k + 1) * per_step]
        return [chunk[(m * self.world + self.rank) * a.batch_size:(m * self.world + self.rank + 1) * a.batch_size]
                for m in range(a.grad_accum)]

    def decodes(self, g: int, items) -> bool:
        """Whether every image of ``items`` (group ``g``'s, as this step uses them) decodes. A group
        with one that does not is skipped from then on, warned about once with its line, as a
        malformed line is at load; the micro-batch trains on the rest."""
        if g in self.skipped:
            return False
        paths = [x.image for x in items if x.has_image]
        try:
            self.features.decode(paths, f"{self.args.data}:{self.groups[g].line}")
        except ImageError as e:
            self.skipped.add(g)
            log.warning("%s:%d: group skipped: %s", self.args.data, self.groups[g].line, e)
            if len(self.skipped) > self.args.max_bad_fraction * len(self.groups):  # the load-time policy, kept
                raise TrainDataError(f"{self.args.data}: {len(self.skipped)} of {len(self.groups)} groups have an "
                                     f"image that does not decode, more than the allowed fraction "
                                     f"{self.args.max_bad_fraction}; fix the data or raise --max-bad-fraction") from None
            return False
        return True

    def zero_loss(self) -> torch.Tensor:
        """A zero loss that still touches every parameter (a micro-batch with nothing to learn from
        takes part in the step, and in a distributed one's gradient reduction)."""
        return sum(p.sum() * 0.0 for p in self.params)

    def align_loss(self, indices: list[int]) -> torch.Tensor:
        """Contrastive alignment of a vision tower trained from scratch with the word embeddings
        (CLIP-style, the text side a fixed bag of word embeddings): for each group whose query or
        positive is an image and the other side has text, the image's mean output embedding
        should be closer to its caption's mean word embedding than to the other captions of the
        micro-batch (InfoNCE both ways, temperature 0.07). Afterwards image tokens enter the
        decoder near the words that describe them, which is what lets reranking across
        modalities be learned in minutes instead of sitting on a plateau."""
        images, captions = [], []
        for g in indices:
            group = self.groups[g]
            if not self.decodes(g, (group.query, group.positive)):
                continue
            for image, text in ((group.query, group.positive), (group.positive, group.query)):
                if image.has_image and text.text:
                    images.append(image.image)
                    captions.append(text.text)
        if len(images) < 2:  # nothing to contrast in this micro-batch
            return self.zero_loss()
        pixels, grid = self.features.pixels(images, f"{self.args.data}")
        ids = [self.features.prompts.tokenizer.encode(c, add_special_tokens=False).ids for c in captions]
        width = max(len(x) for x in ids)
        caption_ids = torch.zeros(len(ids), width, dtype=torch.int64)
        caption_mask = torch.zeros(len(ids), width)
        for i, x in enumerate(ids):
            caption_ids[i, :len(x)] = torch.tensor(x)
            caption_mask[i, :len(x)] = 1.0
        align = {"pixel_values": pixels.to(self.device), "image_grid_thw": grid.to(self.device),
                 "caption_ids": caption_ids.to(self.device), "caption_mask": caption_mask.to(self.device),
                 "merge": self.features.spec.merge_size}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            similarity = self.module(align=align)
        logits = similarity.float() / 0.07
        target = torch.arange(len(images), device=self.device)
        return 0.5 * (torch.nn.functional.cross_entropy(logits, target)
                      + torch.nn.functional.cross_entropy(logits.T, target))

    def micro_loss(self, step: int, indices: list[int]) -> torch.Tensor:
        a = self.args
        if a.objective == "align":
            return self.align_loss(indices)
        epoch = step // self.steps_per_epoch
        rows, labels, sizes = [], [], []
        for g in indices:
            group = self.groups[g]
            docs = [group.positive, *sample_negatives(group, a.negatives, a.seed, epoch, g)]
            if not self.decodes(g, (group.query, *docs)):
                continue
            instruction = group.instruction or self.gmr.default_instruction
            rows += [(instruction, group.query, d) for d in docs]
            labels += [f"{a.data}:{group.line}"] * len(docs)
            sizes.append(len(docs))
        if not sizes:  # every group of this micro-batch had an image that does not decode
            return self.zero_loss()
        inputs = {k: v.to(self.device) for k, v in self.features.build(rows, labels).items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=a.bf16):
            z_yes, z_no = self.module(**inputs)
        width = max(sizes)
        zy = torch.zeros(len(sizes), width, device=self.device)
        zn = torch.zeros(len(sizes), width, device=self.device)
        mask = torch.zeros(len(sizes), width, dtype=torch.bool, device=self.device)
        start = 0
        for i, n in enumerate(sizes):
            zy[i, :n] = z_yes[start:start + n]
            zn[i, :n] = z_no[start:start + n]
            mask[i, :n] = True
            start += n
        return objective_loss(a.objective, zy, zn, mask, a.url_weight, a.url_direction, a.tau)

    def train_step(self) -> float:
        self.module.train()
        micro = self.micro_batches(self.step)
        total = 0.0
        for m, indices in enumerate(micro):
            last = m == len(micro) - 1
            if self.args.fsdp:  # reduce-scatter gradients only after the last micro-batch
                self.head.set_requires_gradient_sync(last)
            sync = self.module.no_sync() if (self.world > 1 and not last and not self.args.fsdp) else contextlib.nullcontext()
            with sync:
                loss = self.micro_loss(self.step, indices) / len(micro)
                loss.backward()
            total += float(loss.detach())
        if self.args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.world > 1:
            t = torch.tensor([total], device=self.device)
            torch.distributed.all_reduce(t)
            total = float(t) / self.world
        return total

    def run(self) -> None:
        a = self.args
        end = min(self.total_steps, a.max_steps) if a.max_steps else self.total_steps
        metrics_path = os.path.join(a.out, "metrics.jsonl")
        show = not a.quiet and self.rank == 0
        start, start_step = time.perf_counter(), self.step
        groups_per_step = a.batch_size * a.grad_accum * self.world
        window: list[float] = []
        progress = Progress(end - start_step, show, "train: ")
        progress.unit = "steps"
        while self.step < end:
            lr = self.scheduler.get_last_lr()[0]
            loss = self.train_step()
            window.append(loss)
            rate = (self.step - start_step) * groups_per_step / max(time.perf_counter() - start, 1e-9)
            if self.rank == 0 and (self.step % a.log_every == 0 or self.step == end):
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": self.step, "epoch": self.step / self.steps_per_epoch, "loss": loss,
                                        "loss_mean": sum(window) / len(window), "lr": lr,
                                        "examples_per_s": rate}) + "\n")
                window = []
            progress.suffix = f"  loss {loss:.4f}  lr {lr:.2e}  {rate:.1f} groups/s"
            progress.update(1)
            if self.step % a.save_every == 0 and self.step < end:
                self.save_state()
        progress.close()
        self.save_state()

    def finish(self) -> None:
        """Writes the GMR checkpoint (process 0) once every planned step has run."""
        trainable, hf_model = self.trainable, self.hf_model
        if self.args.fsdp:  # gather the shards into an unsharded copy of the model on process 0
            full = self._full_params()
            if self.rank != 0:
                return
            a = self.args
            trainable, hf_model = make_trainable(load_model(a.base_model), full=a.full, lora_r=a.lora_r,
                                                 lora_alpha=a.lora_alpha, train_vision=a.train_vision,
                                                 freeze_embeddings=a.freeze_embeddings, freeze_lm_head=a.freeze_lm_head)
            copy = RerankHead(trainable, hf_model, self.features.prompts.yes_id, self.features.prompts.no_id)
            copy.load_state_dict(full, strict=True)
        if self.rank != 0:
            return
        a = self.args
        base_training = self.gmr.training
        self.gmr.training = {
            "objective": a.objective, "url_weight": a.url_weight if a.objective == "url" else None,
            "url_direction": a.url_direction if a.objective == "url" else None,
            "tau": a.tau if a.objective == "url" and a.url_weight == "base_tau" else None,
            "negatives": a.negatives, "mode": "full" if a.full else "lora",
            "lora_r": None if a.full else a.lora_r, "lora_alpha": None if a.full else (a.lora_alpha or 2 * a.lora_r),
            "train_vision": a.train_vision, "freeze_embeddings": a.freeze_embeddings,
            "freeze_lm_head": a.freeze_lm_head, "lr": a.lr, "epochs": a.epochs, "steps": self.step,
            "batch_size": a.batch_size, "grad_accum": a.grad_accum, "world_size": self.world,
            "parallel": "fsdp" if a.fsdp else ("ddp" if self.world > 1 else "single"), "bf16": a.bf16,
            "seed": a.seed, "data": os.path.abspath(a.data), "data_sha256": self.fingerprint["data_sha256"],
            "groups": len(self.groups), "base_model": os.path.abspath(a.base_model), "base_training": base_training,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        trainable.eval()
        save_checkpoint(trainable, hf_model, a.base_model, a.out, self.gmr)
        shutil.rmtree(self.state_dir, ignore_errors=True)  # the run is complete; gmr.json marks it


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    missing = [f"--{k.replace('_', '-')}" for k in ("base_model", "data", "out") if not getattr(args, k)]
    if missing:
        p.error(f"{', '.join(missing)} required")
    problems = check_args(args)
    if problems:
        p.error("; ".join(problems))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not os.path.isfile(os.path.join(args.base_model, "config.json")):
        print(f"train: error: --base-model {args.base_model} is not a checkpoint directory (no config.json)",
              file=sys.stderr)
        return 2
    if os.path.exists(os.path.join(args.out, "gmr.json")):
        print(f"train: error: {args.out} already holds a finished checkpoint; choose a new --out", file=sys.stderr)
        return 2
    if os.path.exists(os.path.join(args.out, STATE_DIR)) and not args.resume:
        print(f"train: error: {args.out} holds an unfinished run; pass --resume to continue it", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    try:
        trainer = Trainer(args)
        if args.resume:
            trainer.load_state()
        trainer.run()
        if trainer.step >= trainer.total_steps:
            trainer.finish()
        if trainer.world > 1:
            # Every process waits for process 0 to write the checkpoint, then leaves at once. Tearing the process
            # groups down (destroy_process_group, or the interpreter's exit with FSDP's device mesh alive) aborted
            # a gloo process now and then ("terminate called without an active exception") after all work was
            # done and written; nothing is left to clean up that the OS does not reclaim.
            torch.distributed.barrier()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except GmrError as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
