"""Multi-node training through Accelerate's launcher, exercised as two "machines" on localhost (one CPU
process each, gloo): `accelerate launch --num_machines 2 --machine_rank R --main_process_ip ...`. The run is
stopped after one epoch and resumed by a second pair of launches (a requeue); every test image is evaluated
exactly once, and the metrics equal those of the same run on one machine with two processes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, launch_two_processes

SCRIPT = Path(__file__).parent / "scripts" / "train_two_machines.py"
KEYS = ("top1", "top5", "many", "medium", "few", "per_class", "num_eval_images")


def launch_two_machines(script, *args, timeout=600) -> list[subprocess.CompletedProcess]:
    """Two `accelerate launch` commands, machine ranks 0 and 1, one process each, meeting at 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    procs = [subprocess.Popen([accelerate, "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
                               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                               "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                               str(script), *map(str, args)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    for r in results:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return results


@pytest.mark.slow
def test_two_machines_train_resume_and_evaluate_like_one(tiny_raw, tmp_path):
    multi, single = tmp_path / "two_machines", tmp_path / "one_machine"
    first = launch_two_machines(SCRIPT, "first", tiny_raw, multi)
    assert "stopped after 1 epoch(s)" in first[0].stdout + first[0].stderr
    assert not (multi / "DONE").exists()
    launch_two_machines(SCRIPT, "resume", tiny_raw, multi)             # the requeued job
    launch_two_processes(SCRIPT, "all", tiny_raw, single)
    for rank in (0, 1):
        state = json.loads((multi / f"rank{rank}_resume.json").read_text())
        assert state["world"] == 2 and state["status"] == "done"
        assert json.loads((multi / f"rank{rank}_first.json").read_text())["step"] * 2 == state["step"]
    assert [json.loads(line)["epoch"] for line in (multi / "metrics.jsonl").read_text().splitlines()] == [0, 1]

    seen = [json.loads((multi / f"eval_seen{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(20_000, 20_064))      # every test image exactly once

    two = json.loads((multi / "metrics.json").read_text())
    one = json.loads((single / "metrics.json").read_text())
    evaluated = json.loads((multi / "evaluated" / "metrics.json").read_text())
    assert two["num_eval_images"] == 64
    for key in KEYS:
        assert two[key] == one[key] == evaluated[key], key
