"""Multi-node training through Accelerate's launcher, exercised as two "machines" on localhost (one CPU
process each, gloo): `accelerate launch --num_machines 2 --machine_rank R --main_process_ip ...`. The run is
stopped after 3 of 8 epochs and resumed by a second pair of launches (a requeue). Both machines resume at the
epoch and step of the checkpoint, and the run ends exactly where the same run on one machine with two
processes ends: the same loss at every step on each rank, the same metrics.jsonl, the same model.pt tensors;
the model has learned (well above chance), and every test image is evaluated exactly once."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, launch_two_processes

SCRIPT = Path(__file__).parent / "scripts" / "train_two_machines.py"
KEYS = ("top1", "top5", "many", "medium", "few", "per_class", "num_eval_images")
STEPS_PER_EPOCH = 5                      # 90 training images, 2 processes x 8 per batch: 45 // 8 batches each


def launch_two_machines(script, *args, timeout=240) -> list[subprocess.CompletedProcess]:
    """Two `accelerate launch` commands, machine ranks 0 and 1, one process each, meeting at 127.0.0.1. When
    one of them fails, the other is stopped (it would wait for its peer until the timeout)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    logs = [Path(f"{args[-1]}.machine{rank}.log") for rank in (0, 1)]
    files = [open(log, "w") for log in logs]
    procs = [subprocess.Popen([accelerate, "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
                               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                               "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                               str(script), *map(str, args)],
                              env=env, stdout=files[rank], stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in files:
            f.close()
    results = [subprocess.CompletedProcess(p.args, p.returncode, log.read_text(), "") for p, log in zip(procs, logs)]
    for r in results:
        assert r.returncode == 0, "\n".join(x.stdout[-4000:] for x in results)
    return results


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def training_values(record: dict) -> dict:
    """A metrics.jsonl line without its wall-clock fields."""
    return {k: v for k, v in record.items() if k not in ("seconds", "train_images_per_s")}


@pytest.mark.slow
def test_two_machines_resume_where_they_stopped_and_end_like_one_machine(tiny_raw, tmp_path):
    multi, single = tmp_path / "two_machines", tmp_path / "one_machine"
    first = launch_two_machines(SCRIPT, "first", tiny_raw, multi)
    assert "stopped after 3 epoch(s) at epoch 3/8" in first[0].stdout
    assert not (multi / "DONE").exists()
    saved = json.loads((multi / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert (saved["epoch"], saved["step"]) == (3, 3 * STEPS_PER_EPOCH)

    resumed = launch_two_machines(SCRIPT, "resume", tiny_raw, multi)             # the requeued job
    assert f"resumed {multi} at epoch 3 (step 15)" in resumed[0].stdout
    launch_two_processes(SCRIPT, "all", tiny_raw, single)

    for rank in (0, 1):
        before = json.loads((multi / f"rank{rank}_first.json").read_text())
        after = json.loads((multi / f"rank{rank}_resume.json").read_text())
        straight = json.loads((single / f"rank{rank}_all.json").read_text())
        assert before["world"] == after["world"] == 2 and after["status"] == "done"
        assert before["started"] == {"epoch": 0, "step": 0}
        assert after["started"] == {"epoch": 3, "step": 15}, f"machine {rank} did not resume at the checkpoint"
        # every step of every epoch exactly once, on each rank, with the loss of the uninterrupted run
        assert [(e, s) for e, s, _ in before["steps"] + after["steps"]] == \
            [(s // STEPS_PER_EPOCH, s) for s in range(8 * STEPS_PER_EPOCH)]
        assert before["steps"] + after["steps"] == straight["steps"], f"rank {rank}: the losses differ"

    assert [r["epoch"] for r in records(multi)] == list(range(8))
    assert [training_values(r) for r in records(multi)] == [training_values(r) for r in records(single)]
    two_model = torch.load(multi / "model.pt", weights_only=True)["state_dict"]
    one_model = torch.load(single / "model.pt", weights_only=True)["state_dict"]
    assert two_model.keys() == one_model.keys()
    assert all(torch.equal(two_model[k], one_model[k]) for k in one_model), "model.pt differs"

    seen = [json.loads((multi / f"eval_seen{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(20_000, 20_064))      # every test image exactly once

    two = json.loads((multi / "metrics.json").read_text())
    one = json.loads((single / "metrics.json").read_text())
    evaluated = json.loads((multi / "evaluated" / "metrics.json").read_text())
    assert two["num_eval_images"] == 64
    assert two["top1"] >= 60 and len(set(two["per_class"])) > 1, two      # learned: chance is 25%
    for key in KEYS:
        assert two[key] == one[key] == evaluated[key], key
