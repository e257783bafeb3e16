"""Training: objectives (the paper's gradient identities), LoRA/full setup, the checkpoint it
writes (accepted by the exporter), resume, torchrun DDP equivalence, bad input."""

import json
import math
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.model

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from gmr_fast.gmr_config import GmrConfig  # noqa: E402
from gmr_fast.prompt import Item  # noqa: E402
from train.features import FeatureBuilder  # noqa: E402
from train.loop import main as train_main  # noqa: E402
from train.model import RerankHead, load_model, make_trainable  # noqa: E402
from train.objectives import cl_loss, objective_loss, sft_loss, url_loss, url_weights  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_z(rng, groups=3, k=5):
    zy = torch.tensor(rng.normal(0, 2, (groups, k)), dtype=torch.float64, requires_grad=True)
    zn = torch.tensor(rng.normal(0, 2, (groups, k)), dtype=torch.float64, requires_grad=True)
    mask = torch.ones(groups, k, dtype=torch.bool)
    mask[1, 3:] = False  # a group with fewer negatives
    return zy, zn, mask


def grads(loss, *xs):
    return torch.autograd.grad(loss, xs, allow_unused=True, materialize_grads=True)


def test_url_reproduces_sft_and_cl_gradients_on_logits(rng):
    zy, zn, mask = random_z(rng)
    for native, weight_dir in ((sft_loss(zy, zn, mask), "sft"), (cl_loss(zy, mask), "cl")):
        url = url_loss(zy, zn, mask, weight_dir, weight_dir)
        for a, b in zip(grads(native, zy, zn), grads(url, zy, zn)):
            torch.testing.assert_close(a * mask, b, rtol=0, atol=1e-12)


def test_url_gradient_is_weight_times_direction(rng):
    """Any weight with any direction: d loss / d z = -(weight x direction), positive ascending,
    negatives descending (direction sft moves z_yes - z_no, direction cl moves z_yes)."""
    zy, zn, mask = random_z(rng)
    sign = torch.ones_like(zy)
    sign[:, 1:] = -1
    groups = zy.shape[0]
    for weight in ("sft", "cl", "base", "base_tau"):
        w = url_weights(zy, zn, mask, weight, 0.2)
        for direction in ("sft", "cl"):
            gy, gn = grads(url_loss(zy, zn, mask, weight, direction, 0.2), zy, zn)
            torch.testing.assert_close(gy, -w * sign / groups, rtol=0, atol=1e-12)
            expected_n = w * sign / groups if direction == "sft" else torch.zeros_like(w)
            torch.testing.assert_close(gn, expected_n, rtol=0, atol=1e-12)
    # the weights themselves
    p = torch.sigmoid(zy - zn).detach()
    soft = torch.softmax(zy.detach().masked_fill(~mask, float("-inf")), 1)
    torch.testing.assert_close(url_weights(zy, zn, mask, "sft", 0)[:, 0], 1 - p[:, 0])
    torch.testing.assert_close(url_weights(zy, zn, mask, "cl", 0)[:, 1:], soft[:, 1:] * mask[:, 1:])
    tau = url_weights(zy, zn, mask, "base_tau", 0.2)
    assert torch.equal(tau[:, 0] == 1, p[:, 0] <= 0.8)
    assert torch.equal(tau[:, 1:] == 1, (p[:, 1:] >= 0.2) & mask[:, 1:])


@pytest.fixture(scope="module")
def groups_and_images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("train_data")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (56 + 14 * i, 70, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    groups = []
    for g in range(16):
        neg = [{"text": f"negative {g} {j} " + "word " * int(rng.integers(1, 12))} for j in range(int(rng.integers(1, 6)))]
        if g % 3 == 0:
            neg.append({"image": f"im{g % 6}.png"})
        query = {"text": f"query number {g}", "image": f"im{(g + 1) % 6}.png"} if g % 4 == 1 else f"query number {g}"
        groups.append({"instruction": "Find it.", "query": query, "positive": f"positive document {g}", "negatives": neg})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in groups))
    return path


def model_gradients(ckpt, data_path, objective, weight=None, direction=None, full=True):
    """Gradients of every trainable parameter, computed in float64: the identities are exact
    in real arithmetic, and in float64 the two losses' different summation orders leave
    relative differences of ~1e-15 instead of fp32's ~1e-7 (whose worst element over ~1e7 can
    exceed any fixed fp32 tolerance on one CPU and not another)."""
    from train.data import load_groups

    torch.manual_seed(0)
    model = load_model(str(ckpt), attn_implementation="eager").to(torch.float64)
    trainable, hf = make_trainable(model, full=full, lora_r=4, lora_alpha=8, train_vision=False)
    if not full:  # LoRA B starts at zero: give the adapters values so every gradient path is live
        with torch.no_grad():
            for n, p in trainable.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    features = FeatureBuilder(str(ckpt), GmrConfig.load(ckpt), 151643)
    head = RerankHead(trainable, hf, features.prompts.yes_id, features.prompts.no_id)
    groups = load_groups(str(data_path))[:4]
    rows, sizes = [], []
    for g in groups:
        docs = [g.positive, *g.negatives]
        rows += [(g.instruction, g.query, d) for d in docs]
        sizes.append(len(docs))
    # one document per forward pass: no padding (HF's float64 masks turn fully padded rows into
    # NaN), and the loss still sees every document of every group at once
    zs = []
    for row in rows:
        inputs = features.build([row], ["g"])
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(torch.float64)
        zs.append(head(**inputs))
    z_yes, z_no = torch.cat([z[0] for z in zs]), torch.cat([z[1] for z in zs])
    width = max(sizes)
    zy, zn = torch.zeros(len(sizes), width, dtype=z_yes.dtype), torch.zeros(len(sizes), width, dtype=z_yes.dtype)
    mask = torch.zeros(len(sizes), width, dtype=torch.bool)
    start = 0
    for i, n in enumerate(sizes):
        zy[i, :n], zn[i, :n], mask[i, :n] = z_yes[start:start + n], z_no[start:start + n], True
        start += n
    loss = objective_loss(objective, zy, zn, mask, weight, direction)
    params = {n: p for n, p in head.named_parameters() if p.requires_grad}
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))


@pytest.mark.parametrize("full", [True, False], ids=["full", "lora"])
def test_url_matches_native_gradients_on_a_tiny_model(tiny_checkpoints, groups_and_images, full):
    """The paper's sanity check: grad URL(W_sft, D_sft) == grad SFT and grad URL(W_cl, D_cl) ==
    grad CL, over every trainable parameter of a tiny Qwen2.5-VL (text and image documents)."""
    ckpt = tiny_checkpoints["qwen2_5_vl"]
    for native, same in (("sft", "sft"), ("cl", "cl")):
        a = model_gradients(ckpt, groups_and_images, native, full=full)
        b = model_gradients(ckpt, groups_and_images, "url", same, same, full=full)
        assert a.keys() == b.keys() and len(a) > 4
        nonzero = 0
        for name in a:
            if a[name] is None:
                assert b[name] is None
                continue
            # float64: 1e-9 relative is six orders above float64 rounding and six below any real
            # difference between the objectives (which differ by O(1) relative, checked below)
            scale = float(a[name].abs().max())
            torch.testing.assert_close(a[name], b[name], rtol=1e-9, atol=1e-12 * max(scale, 1.0),
                                       msg=lambda m: f"{native} {name}: {m}")
            nonzero += int(a[name].abs().sum() > 0)
        assert nonzero > 4
    # and the two objectives really differ
    a = model_gradients(ckpt, groups_and_images, "sft", full=full)
    b = model_gradients(ckpt, groups_and_images, "cl", full=full)
    assert any(a[n] is not None and not torch.allclose(a[n], b[n]) for n in a)


def test_lora_targets_only_the_language_model(tiny_checkpoints):
    model = load_model(str(tiny_checkpoints["qwen2_5_vl"]))
    trainable, _ = make_trainable(model, full=False, lora_r=4, lora_alpha=8, train_vision=False)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and "language_model" in n for n in names)
    assert {n.split(".lora_")[0].split(".")[-1] for n in names} >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def run_train(*args):
    return train_main([str(a) for a in args] + ["--quiet", "--threads", "1"])


def load_weights(path):
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_train_writes_an_exportable_checkpoint_and_resumes(tiny_checkpoints, groups_and_images, tmp_path):
    ckpt = tiny_checkpoints["qwen2_5_vl"]
    common = ["--base-model", ckpt, "--data", groups_and_images, "--objective", "url", "--url-weight", "base_tau",
              "--url-direction", "cl", "--negatives", 3, "--batch-size", 2, "--grad-accum", 2, "--lr", 1e-3,
              "--epochs", 1, "--log-every", 1]
    assert run_train(*common, "--out", tmp_path / "a") == 0
    out = tmp_path / "a"
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all({"loss", "lr", "examples_per_s"} <= set(m) for m in metrics)
    gmr = json.load(open(out / "gmr.json"))
    assert gmr["training"]["objective"] == "url" and gmr["training"]["url_weight"] == "base_tau"
    assert gmr["training"]["mode"] == "lora" and gmr["training"]["lora_r"] == 16 and gmr["training"]["steps"] == 4
    assert not (out / "train_state").exists()
    weights, base = load_weights(out), load_weights(ckpt)
    assert weights.keys() == base.keys()  # LoRA merged: a plain checkpoint
    changed = [k for k in weights if not np.array_equal(weights[k], base[k])]
    assert changed and not any("visual" in k for k in changed)

    # the exporter takes it unchanged, and the engine scores as the trained torch model
    from export.engine_export import ExportOptions, export_engine

    manifest = export_engine(out, tmp_path / "engine", ExportOptions(dtypes=("fp32",), validation_queries=2,
                                                                       validation_documents=6))
    assert manifest.variants["fp32"].validation["max_rel_error"] <= 1e-3
    from gmr_fast import Reranker

    model = load_model(str(out), attn_implementation="eager")
    features = FeatureBuilder(str(out), GmrConfig.load(out), 151643)
    head = RerankHead(model, model, features.prompts.yes_id, features.prompts.no_id)
    image = str(groups_and_images.parent / "im2.png")
    rows = [("Find it.", Item("query number 3"), Item("positive document 3")),
            ("Find it.", Item("query", image), Item("negative 1 0 word word"))]
    with torch.no_grad():
        zy, zn = head(**features.build(rows, ["a", "b"]))
    served = Reranker(tmp_path / "engine").score([("query number 3", "positive document 3"),
                                                  ({"text": "query", "image": image}, "negative 1 0 word word")],
                                                 instruction="Find it.")
    np.testing.assert_allclose(served, (zy - zn).numpy(), atol=1e-4)

    # stopped after 2 steps then resumed == uninterrupted, bit for bit
    assert run_train(*common, "--out", tmp_path / "b", "--max-steps", 2) == 0
    assert (tmp_path / "b" / "train_state").exists() and not (tmp_path / "b" / "gmr.json").exists()
    assert run_train(*common, "--out", tmp_path / "b") == 2  # needs --resume
    assert run_train(*common, "--out", tmp_path / "b", "--resume", "--lr", 2e-3) == 2  # not the same run
    assert run_train(*common, "--out", tmp_path / "b", "--resume") == 0
    resumed = load_weights(tmp_path / "b")
    for k in weights:
        np.testing.assert_array_equal(resumed[k], weights[k], err_msg=k)
    assert run_train(*common, "--out", tmp_path / "b") == 2  # finished: refuses to overwrite


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_equals_gradient_accumulation(parallel, tiny_checkpoints, groups_and_images, tmp_path):
    """2 processes x accumulation 1 == 1 process x accumulation 2, replicated (DDP) or sharded (FSDP)."""
    ckpt = tiny_checkpoints["qwen2_vl"]
    common = ["--base-model", str(ckpt), "--data", str(groups_and_images), "--objective", "sft", "--full",
              "--negatives", "3", "--batch-size", "2", "--lr", "1e-3", "--epochs", "1", "--quiet", "--threads", "1"]
    assert train_main(common + ["--grad-accum", "2", "--out", str(tmp_path / "single")]) == 0
    extra = ["--fsdp"] if parallel == "fsdp" else []
    torchrun(*common, "--grad-accum", "1", "--out", str(tmp_path / "ddp"), *extra)
    single, ddp = load_weights(tmp_path / "single"), load_weights(tmp_path / "ddp")
    training = json.load(open(tmp_path / "ddp" / "gmr.json"))["training"]
    assert training["world_size"] == 2 and training["parallel"] == parallel
    base = load_weights(ckpt)
    moved = 0
    for k in single:
        np.testing.assert_allclose(ddp[k], single[k], rtol=0, atol=2e-5, err_msg=k)
        moved += int(not np.array_equal(single[k], base[k]))
    assert moved > 10
    if parallel == "fsdp":  # the sharded state saves and resumes too
        torchrun(*common, "--grad-accum", "1", "--out", str(tmp_path / "part"), "--max-steps", "2", *extra)
        assert (tmp_path / "part" / "train_state").exists() and not (tmp_path / "part" / "gmr.json").exists()
        torchrun(*common, "--grad-accum", "1", "--out", str(tmp_path / "part"), "--resume", *extra)
        resumed = load_weights(tmp_path / "part")
        for k in ddp:
            np.testing.assert_allclose(resumed[k], ddp[k], rtol=0, atol=1e-6, err_msg=k)


def torchrun(*args):
    with socket.socket() as s:  # a free port (torchrun's static rendezvous cannot take port 0)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                             "-m", "train", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # never leave the workers behind
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "--batch-size 0: expected >= 1"),
    (["--grad-accum", "0"], "--grad-accum 0: expected >= 1"),
    (["--negatives", "-1"], "--negatives -1: expected >= 1"),
    (["--lr", "-1"], "--lr -1.0: expected > 0"),
    (["--epochs", "0"], "--epochs 0.0: expected > 0"),
    (["--max-steps", "-3"], "--max-steps -3: expected >= 1"),
    (["--warmup-ratio", "2"], "--warmup-ratio 2.0: expected a fraction in [0, 1)"),
    (["--lora-r", "0"], "--lora-r 0: expected >= 1"),
    (["--max-bad-fraction", "1.5"], "--max-bad-fraction 1.5"),
])
def test_numbers_a_run_cannot_take_end_it_before_anything_loads(tmp_path, capsys, flags, message):
    """Before: a zero batch or accumulation was a ZeroDivisionError, a negative rate or LoRA rank a
    traceback from torch or peft, and no epochs or a negative --max-steps trained nothing and still
    wrote a checkpoint. Now exit code 2 naming the flag, before any weight loads (the checkpoint
    here does not even exist)."""
    from train.loop import main

    with pytest.raises(SystemExit) as e:
        main(["--base-model", str(tmp_path / "none"), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"),
              *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_text_utf8_cannot_encode_is_a_malformed_group(tmp_path, caplog):
    """A lone surrogate (JSON's "\\udc80") in any text of a group: the tokenizer would stop the run
    with a TypeError at that group's first batch; the group is skipped at load like any malformed
    line, named, and counted against --max-bad-fraction."""
    from train.data import TrainDataError, load_groups

    good = {"query": "q", "positive": "p", "negatives": ["n1", "n2"]}
    lines = [good] * 20 + [{**good, "positive": "a \udc80"}, {**good, "negatives": ["n", {"text": "\ud800"}]},
                           {**good, "instruction": "\udfff"}, {**good, "query": {"text": "ok \u00e9t\u00e9"}}]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    groups = load_groups(str(data), 0.2)
    assert len(groups) == 21 and groups[-1].query.text == "ok \u00e9t\u00e9"
    for line, what in ((21, "'positive' text"), (22, "negative 1 text"), (23, "'instruction'")):
        assert f"d.jsonl:{line}: malformed group skipped ({what}: not valid Unicode text" in caplog.text
    with pytest.raises(TrainDataError, match="3 of 24 groups are malformed"):
        load_groups(str(data), 0.1)
    # bytes that are not UTF-8 fail their line (before: a UnicodeDecodeError ended the run); a BOM is read past
    data.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(x) for x in lines[:20]).encode() + b'\n{"query": "caf\xe9", '
                     b'"positive": "p", "negatives": ["n"]}\n')
    assert len(load_groups(str(data), 0.1)) == 20
    assert "d.jsonl:21: malformed group skipped (not UTF-8 text (byte 0xe9 at column 15))" in caplog.text


def test_bad_training_data(tiny_checkpoints, tmp_path, capsys, caplog):
    ckpt = tiny_checkpoints["qwen2_vl"]
    good = {"query": "q", "positive": "p", "negatives": ["n1", "n2"]}
    lines = [json.dumps(good)] * 30 + ["{not json", json.dumps({"query": "q", "negatives": []})]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    args = ["--base-model", ckpt, "--data", data, "--batch-size", 4, "--negatives", 2, "--max-steps", 1,
            "--lora-r", 2]
    assert run_train(*args, "--out", tmp_path / "o1", "--max-bad-fraction", 0.1) == 0
    assert "d.jsonl:31: malformed group skipped" in caplog.text and "d.jsonl:32" in caplog.text
    assert "skipped 2 malformed group(s) of 32" in caplog.text
    assert run_train(*args, "--out", tmp_path / "o2", "--max-bad-fraction", 0.01) == 2
    assert "2 of 32 groups are malformed" in capsys.readouterr().err
    # a missing image fails its group like a malformed one: skipped within the bad fraction, refused above it
    data.write_text("\n".join([json.dumps(good)] * 30 + [json.dumps({**good, "positive": {"image": "nope.png"}})]) + "\n")
    assert run_train(*args, "--out", tmp_path / "o3", "--max-bad-fraction", 0.1) == 0
    assert "d.jsonl:31: malformed group skipped (image" in caplog.text and "nope.png' does not exist" in caplog.text
    assert run_train("--base-model", tmp_path / "none", *args[2:], "--out", tmp_path / "o0") == 2
    assert "--base-model " + str(tmp_path / "none") + " is not a checkpoint directory" in capsys.readouterr().err
    data.write_text(json.dumps(good) + "\n" + json.dumps({**good, "positive": {"image": "nope.png"}}) + "\n")
    assert run_train(*args, "--out", tmp_path / "o4") == 2
    assert "1 of 2 groups are malformed (lines [2]" in capsys.readouterr().err
    # an image that exists but does not decode: its group is skipped when first used, the step trains on the rest
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data.write_text("\n".join([json.dumps(good)] * 3 + [json.dumps({**good, "negatives": [{"image": "bad.png"}]})])
                    + "\n")
    assert run_train(*args, "--out", tmp_path / "o5", "--max-bad-fraction", 0.3, "--epochs", 3) == 0
    assert "d.jsonl:4: group skipped" in caplog.text and "bad.png" in caplog.text
    metrics = [json.loads(x) for x in open(tmp_path / "o5" / "metrics.jsonl")]
    assert metrics and all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics if "loss" in m)
    # the groups found undecodable are part of the saved state: a resumed run skips them without
    # decoding or warning again, and counts them against the bad fraction
    state = torch.load(tmp_path / "o5" / "train_state" / "state.pt", map_location="cpu", weights_only=False)
    assert state["skipped"] == [3]
    caplog.clear()
    resumed = [a if a != 1 else 2 for a in args]  # --max-steps 2
    assert run_train(*resumed, "--out", tmp_path / "o5", "--max-bad-fraction", 0.3, "--epochs", 3, "--resume") == 0
    assert "group skipped" not in caplog.text
    assert [m["step"] for m in map(json.loads, open(tmp_path / "o5" / "metrics.jsonl"))][-1] == 2  # it trained on
    assert torch.load(tmp_path / "o5" / "train_state" / "state.pt", map_location="cpu",
                      weights_only=False)["skipped"] == [3]
    assert run_train(*args, "--out", tmp_path / "o6") == 2  # above the bad fraction (0.05), as at load
    assert "1 of 4 groups have an image that does not decode" in capsys.readouterr().err


def test_features_match_the_runtime_prompt(tiny_checkpoints):
    """Training inputs are built by the runtime's renderer: same ids as the engine would see."""
    from gmr_fast.prompt import PromptBuilder

    ckpt = tiny_checkpoints["qwen2_vl"]
    gmr = GmrConfig.load(ckpt)
    fb = FeatureBuilder(str(ckpt), gmr, 151643)
    pb = PromptBuilder(os.path.join(ckpt, "tokenizer.json"), gmr)
    rows = [("Find.", Item("short"), Item("a much longer document " * 5)), ("Find.", Item("q"), Item("d"))]
    batch = fb.build(rows, ["a", "b"])
    for r, (ins, q, d) in enumerate(rows):
        ids = pb.encode(ins, q, d).ids
        assert batch["input_ids"][r, -len(ids):].tolist() == ids.tolist()
        assert int(batch["attention_mask"][r].sum()) == len(ids)


def test_bf16_and_gradient_checkpointing_run(tiny_checkpoints, groups_and_images, tmp_path):
    args = ["--base-model", tiny_checkpoints["qwen2_5_vl"], "--data", groups_and_images, "--negatives", 2,
            "--batch-size", 2, "--max-steps", 1, "--bf16", "--gradient-checkpointing", "--lora-r", 2]
    assert run_train(*args, "--out", tmp_path / "lora") == 0
    assert run_train(*args, "--full", "--out", tmp_path / "full") == 0
    for name in ("lora", "full"):
        metrics = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        assert metrics[-1]["step"] == 1 and np.isfinite(metrics[-1]["loss"])
