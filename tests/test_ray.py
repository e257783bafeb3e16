"""``python -m gmr_fast.score --ray local --workers 2``: a local Ray cluster started inside a
network namespace that has only loopback (Ray otherwise binds to the machine's own address).
Outputs equal a single-process run byte for byte; a worker killed mid-job and a driver killed
then resumed change nothing; a worker that cannot load the engine fails the job with its reason."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from suite_helpers import mixed_dataset

pytestmark = pytest.mark.e2e
pytest.importorskip("ray")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("scores.jsonl", "errors.jsonl", "run.trec")


def _namespace_works() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    probe = subprocess.run(["unshare", "-n", "--", "ip", "link", "set", "lo", "up"], capture_output=True)
    return probe.returncode == 0


if not _namespace_works():
    pytest.skip("needs `unshare -n` (root) to run Ray on loopback only", allow_module_level=True)


def in_namespace(args: list[str]) -> list[str]:
    """The command run in a fresh network namespace whose only interface is loopback."""
    return ["unshare", "-n", "--", "bash", "-c", 'ip link set lo up && exec "$@"', "bash", *args]


def outputs(out, datasets=("one", "two")) -> dict:
    got = {f"{d}/{f}": open(out / d / f, "rb").read() for d in datasets for f in FILES}
    got.update({f: open(out / f, "rb").read() for f in ("report.json", "report.md")})
    return got


def lines(path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def job(exported_engines, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_job")
    suite = root / "suite"
    mixed_dataset(str(suite), "one", n_queries=10, seed=11)
    mixed_dataset(str(suite), "two", n_queries=10, seed=12)
    with open(suite / "one" / "corpus.jsonl", "a") as f:  # a failing item too
        f.write(json.dumps({"id": "dx", "image": "images/missing.png"}) + "\n")
    with open(suite / "one" / "candidates.trec", "a") as f:
        f.write("q0 Q0 dx 11 0.1 first\n")
    engine = str(exported_engines["qwen2_5_vl"][1])
    common = ["--engine", engine, "--data", str(suite), "--max-batch-size", "2", "--chunk-pairs", "10", "--quiet"]
    single = root / "single"
    proc = subprocess.run([sys.executable, "-m", "gmr_fast.score", *common, "--threads", "1", "--out", str(single)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "common": common, "reference": outputs(single), "engine": engine}


def ray_cmd(job, out, *extra) -> list[str]:
    return in_namespace([sys.executable, "-m", "gmr_fast.score", *job["common"], "--ray", "local", "--workers", "2",
                         "--worker-cpus", "1", "--out", str(out), *extra])


def test_two_workers_give_the_single_process_outputs(job):
    out = job["root"] / "ray"
    proc = subprocess.run(ray_cmd(job, out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert outputs(out) == job["reference"]
    session = json.load(open(out / "run.json"))["sessions"][-1]
    assert session["workers"] == 2 and session["ray"] == "local"
    # the job's image plan travels with the chunks: the document images recur across the queries'
    # chunks, and the actors keep them for the later ones (whichever actor each chunk reaches)
    for name in ("one", "two"):
        stats = session["datasets"][name]
        assert stats["recurring_images"] > 0 and stats["image_cache_budget_mb"] > 0
        assert stats["image_cache_hits"] > 0 and stats["images_shared"] >= 0  # hits some actors took from others


def test_without_the_image_plan_the_actors_encode_every_chunks_images(job):
    out = job["root"] / "ray_no_plan"
    proc = subprocess.run(ray_cmd(job, out, "--no-image-cache-plan"), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert outputs(out) == job["reference"]  # the plan changes no score bit
    for stats in json.load(open(out / "run.json"))["sessions"][-1]["datasets"].values():
        assert stats["image_cache_hits"] == 0 and stats["images_encoded"] > 0 and "recurring_images" not in stats


def test_a_worker_killed_mid_job_changes_nothing(job):
    out = job["root"] / "killed_worker"
    proc = subprocess.Popen(ray_cmd(job, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and lines(out / "one" / "scores.jsonl") < 5:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        pids = subprocess.run(["pgrep", "-f", "ScoreWorker"], capture_output=True, text=True).stdout.split()
        assert pids, "no Ray worker process found"
        os.kill(int(pids[0]), signal.SIGKILL)
        assert proc.wait(600) == 0, proc.stderr.read().decode()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert outputs(out) == job["reference"]  # the chunk was scored again and written once


def test_a_killed_driver_resumes_on_ray(job):
    out = job["root"] / "killed_driver"
    proc = subprocess.Popen(ray_cmd(job, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and lines(out / "one" / "scores.jsonl") < 10:
        time.sleep(0.05)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the cluster it started
    proc.wait()
    resumed = subprocess.run(ray_cmd(job, out, "--resume"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert outputs(out) == job["reference"]


def test_a_worker_that_cannot_load_the_engine_fails_the_job(job, tmp_path):
    broken = tmp_path / "engine"
    shutil.copytree(job["engine"], broken)
    (broken / "decoder.fp32.weights").write_bytes(b"truncated")
    common = [a if a != job["engine"] else str(broken) for a in job["common"]]
    cmd = in_namespace([sys.executable, "-m", "gmr_fast.score", *common, "--ray", "local", "--workers", "2",
                        "--out", str(tmp_path / "out")])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "a Ray worker could not load the engine" in proc.stderr, proc.stderr[-3000:]
