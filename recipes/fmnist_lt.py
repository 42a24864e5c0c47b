"""The embedded default: the paper's two findings on real Fashion-MNIST-LT, on 2 CPU cores.

Data (fixed, conversion seed 0): Fashion-MNIST-LT, exp profile, rho 100, 500 labeled images for the largest
class down to 5 (1,236 in all; many/medium/few = 4/3/3 classes); a balanced val split of 100 train images
per class that are neither labeled nor in a pool (model selection only); the balanced 10,000-image test
set; and two conversions that differ only in the unlabeled pool (5x the labeled size, from the remaining
train images): rho_U = 1 (balanced, 618 per class) and rho_U = 100 (as long-tailed as the labeled set).
The labeled, val and test sets of the two conversions are identical (checked before training).

Methods, each with training seeds 0, 1, 2 (the data stay fixed at seed 0), as the paper's code trains them:
  CE                                  cross-entropy on the labeled long-tailed set
  CE + rotation SSP                   rotation pre-training (one rotation per image, labels balanced per
                                      batch) on the labeled images, then CE from that backbone
  CE + self-training (rho_U 1 / 100)  the CE model of the same seed labels the pool (argmax, no threshold);
                                      CE on ONE set of labeled + pseudo-labeled images (twice the CE
                                      batch, as train_semi.py; an epoch is one pass over the union, ~6x
                                      a CE epoch)

Sized for 15 minutes on 2 CPU cores, conversion and evaluation included (compute, not accuracy, decided
every size): ResNet-32 at a quarter of its width (4/8/16 channels), n_max 500 instead of 1,000 (the
self-training epochs, 6x a CE epoch, dominate the cost), 16 epochs with the CIFAR schedule at its positions
in the run (lr x0.01 from 80%, x0.0001 from 90%; warm-up 1 epoch), evaluation on val every epoch, test at
the end. A 12-epoch version took 9.6 minutes on 2 idle cores; 16 epochs fill the budget with a margin.
Departure from the paper: batch 32 (joint stage 64) instead of 128 (256), chosen on the val split: at 1,236
labeled images batch 128 gives 9 steps per epoch, and in 12-epoch runs CE seed 0 reached 38.8% val top-1 at
the last epoch with batch 128 against 43.5% with batch 32 (lr 0.1 in both). "final" is the last epoch; "best"
is the test accuracy at the epoch of the highest val top-1 (not the best test epoch).

The 12 training jobs (CE; rotation -> CE; pseudo-label -> joint, per pool; each per seed) run as separate
processes of one thread each, as many at a time as there are cores, so the numbers are the same on every
machine with the same package versions. Running the demo again skips what is done and resumes the rest.

Outputs in --out: results.json (fasttrain.report summary: mean / sd / per seed, final and best),
results.md (tables + the pseudo-label accuracy per class, checked afterwards against the pool's hidden
labels, which training never reads), groups.png (many/medium/few), per_class.png, logs/JOB.log.

    python recipes/fmnist_lt.py --out runs/fmnist_lt [--seeds 0,1,2] [--processes N]   # `make demo`
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import CIFAR  # noqa: E402

from fasttrain.chain import Stage, process_state, run_chain  # noqa: E402
from fasttrain.entry import run_main  # noqa: E402
from fasttrain.evaluate import plot_per_class  # noqa: E402

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
CONVERT = ["--source", "fmnist", "--root", FMNIST_ROOT, "--profile", "exp", "--rho", "100",
           "--max-per-class", "500", "--unlabeled-factor", "5", "--val-per-class", "100", "--seed", "0",
           "--formats", "ffcv,dali"]
POOLS = {"u1": 1, "u100": 100}            # data directory suffix -> rho_U
SEEDS = (0, 1, 2)

DEMO = dict(CIFAR, width=0.25, epochs=16, warmup_epochs=1, batch_size=32, eval_every=1,
            loader="device")
JOINT = dict(DEMO, batch_size=64)         # twice the labeled-stage batch, as train_semi.py's 256 vs 128


def stages(data: dict[str, str], seeds=SEEDS) -> list[Stage]:
    """CE, then rotation -> CE, for every seed; then per seed, for each pool: pseudo-label -> joint CE (an
    interrupted demo has the cheap rows for all seeds first). `data[pool]` are the two conversions (the
    labeled set and the test set are the same in both)."""
    out = [Stage(f"ce_s{s}", dict(DEMO, seed=s), data=data["u1"]) for s in seeds]
    for s in seeds:
        out += [Stage(f"rotation_s{s}", dict(DEMO, method="rotation", seed=s), data=data["u1"]),
                Stage(f"ce_rotation_ssp_s{s}", dict(DEMO, seed=s, pretrained=f"{{root}}/rotation_s{s}/backbone.pt"),
                      data=data["u1"])]
    for s in seeds:
        for pool in POOLS:
            out += [Stage(f"pseudo_{pool}_s{s}", dict(DEMO, seed=s), kind="pseudo_label", source=f"{{root}}/ce_s{s}",
                          data=data[pool]),
                    Stage(f"self_training_{pool}_s{s}", dict(JOINT, seed=s), data=f"{{root}}/pseudo_{pool}_s{s}/data")]
    return out


TABLE = [("CE", "ce"), ("CE + rotation SSP", "ce_rotation_ssp"),
         ("CE + self-training (rho_U 1)", "self_training_u1"), ("CE + self-training (rho_U 100)", "self_training_u100")]


def jobs(seeds) -> list[tuple[str, list[str], list[str]]]:
    """The demo's stages as independent jobs (name, stages, stages they need), in the order they start:
    the CE runs first (every self-training job waits for its seed's CE model), then the long self-training
    jobs, then rotation -> CE, which only fills the last slots."""
    out = [(f"ce_s{s}", [f"ce_s{s}"], []) for s in seeds]
    out += [(f"self_training_{pool}_s{s}", [f"pseudo_{pool}_s{s}", f"self_training_{pool}_s{s}"], [f"ce_s{s}"])
            for s in seeds for pool in POOLS]
    out += [(f"rotation_ssp_s{s}", [f"rotation_s{s}", f"ce_rotation_ssp_s{s}"], []) for s in seeds]
    return out


def run_jobs(argv: list[str], out: Path, seeds, processes: int) -> None:
    """Each job is this script with `--stages`, in its own process with ONE thread (so every number is the
    same on any machine, whatever its core count), `processes` at a time; its log goes to out/logs/JOB.log.
    Finished stages are skipped and interrupted ones resumed, so running the demo again continues it."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", FASTTRAIN_DEMO_JOB="1")
    pending, running, done = jobs(seeds), {}, set()
    try:
        while pending or running:
            while len(running) < processes:
                job = next((j for j in pending if all(d in done for d in j[2])), None)
                if job is None:
                    break
                pending.remove(job)
                name, job_stages, _ = job
                cmd = [sys.executable, __file__, *argv, "--seeds", ",".join(map(str, seeds)),
                       "--stages", ",".join(job_stages)]
                with open(logs / f"{name}.log", "a") as log:
                    running[subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)] = \
                        (job, time.perf_counter())
                print(f"[fasttrain] started {name}", flush=True)
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                (name, job_stages, _), t0 = running.pop(proc)
                if proc.returncode != 0:
                    tail = (logs / f"{name}.log").read_text().strip().splitlines()[-1:]
                    raise SystemExit(f"error: demo job {name} failed (exit {proc.returncode}): "
                                     f"{tail[0] if tail else ''}; full log: {logs / name}.log")
                done.update(job_stages)
                print(f"[fasttrain] finished {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        for proc in running:
            proc.kill()


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    seeds, processes = SEEDS, len(os.sched_getaffinity(0))
    for flag in ("--seeds", "--processes"):
        if flag in argv:
            i = argv.index(flag)
            value = argv[i + 1]
            del argv[i:i + 2]
            if flag == "--seeds":
                seeds = tuple(int(s) for s in value.split(","))
            else:
                processes = max(1, int(value))
    if "-h" in argv or "--help" in argv:
        run_chain(stages({p: "DATA" for p in POOLS}, seeds), __doc__, argv)  # prints the help, converts nothing
    out = Path(_value(argv, "--out") or _value(argv, "--resume") or "runs/fmnist_lt")
    if "--out" not in argv and "--resume" not in argv:
        argv += ["--out", str(out)]
    given = _value(argv, "--data")
    data = {p: given or str(out / f"data_{p}") for p in POOLS}
    if os.environ.get("FASTTRAIN_DEMO_JOB"):   # one job of run_jobs: its stages, no conversion, no report
        run_chain(stages(data, seeds), __doc__, argv)
        return
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    t_start = time.perf_counter()
    if given is None:
        state = process_state()  # under `accelerate launch`, one process converts while the others wait
        if state.is_main_process:
            for pool, rho_u in POOLS.items():
                if not (Path(data[pool]) / "manifest.json").exists():
                    t0 = time.perf_counter()
                    subprocess.run([sys.executable, "-m", "data_prep.convert", *CONVERT, "--rho-u", str(rho_u),
                                    "--out", data[pool]], check=True)
                    print(f"[fasttrain] converted {data[pool]} in {time.perf_counter() - t0:.0f} s", flush=True)
            check_same_labeled_set(*data.values())
        state.wait_for_everyone()
    if distributed or "--stages" in argv:   # under `accelerate launch` (or for chosen stages): one chain
        finished = run_chain(stages(data, seeds), __doc__, argv) == "done"
    else:
        run_jobs(argv, out, seeds, processes)
        finished = True
    if finished and process_state().is_main_process:
        report(out, data, seeds)
        print(f"[fasttrain] demo wall clock: {time.perf_counter() - t_start:.0f} s", flush=True)


def check_same_labeled_set(a: str, b: str) -> None:
    from fasttrain.dataset import DatasetDir
    x, y = DatasetDir(a), DatasetDir(b)
    for split in ("train", "test"):
        if not np.array_equal(x.split(split).source_index, y.split(split).source_index):
            raise SystemExit(f"error: {a} and {b} hold different {split} sets; delete them and run again")


def report(out: Path, data: dict, seeds) -> None:
    from fasttrain.report import markdown, plot_groups, summarize, write_results
    groups = {label: [out / f"{stage}_s{s}" for s in seeds] for label, stage in TABLE
              if all((out / f"{stage}_s{s}" / "metrics.json").exists() for s in seeds)}
    if not groups:
        return
    summary = summarize(groups)
    write_results(summary, out / "results.json")
    text = markdown(summary) + pseudo_label_analysis(out, data, seeds)
    (out / "results.md").write_text(text)
    plot_groups(summary, out / "groups.png", title="Fashion-MNIST-LT (rho 100), test accuracy by shot group")
    per_class, counts = {}, None
    for label, runs in groups.items():
        ms = [json.loads((r / "metrics.json").read_text()) for r in runs]
        counts = ms[0]["train_class_counts"]
        per_class[label] = np.mean([m["per_class"] for m in ms], axis=0).tolist()
    plot_per_class(per_class, counts, out / "per_class.png", split="test",
                   title=f"Fashion-MNIST-LT (rho 100), test accuracy, mean of seeds {','.join(map(str, seeds))}")
    print("\n" + text + f"\nsaved {out / 'results.json'}, {out / 'results.md'}, {out / 'groups.png'} and "
          f"{out / 'per_class.png'}")


def pseudo_label_analysis(out: Path, data: dict, seeds) -> str:
    """Analysis only, after training: how right the pseudo-labels were, per true class (the pool's hidden
    labels never reached training)."""
    lines = []
    for pool, rho_u in POOLS.items():
        hidden = Path(data[pool]) / "unlabeled.true_labels.npy"
        tables = [out / f"pseudo_{pool}_s{s}" / "pseudo_labels.npz" for s in seeds]
        if not hidden.exists() or not all(t.exists() for t in tables):
            continue
        true = np.load(hidden)
        classes = np.arange(true.max() + 1)
        labels = [np.load(t)["label"] for t in tables]
        overall = np.mean([np.mean(p == true) for p in labels])
        recall = np.mean([[np.mean(p[true == c] == c) for c in classes] for p in labels], axis=0)
        given = np.mean([np.bincount(p, minlength=len(classes)) for p in labels], axis=0)
        if not lines:
            lines += ["", "Pseudo-labels of the pool (analysis only: checked after training against the pool's "
                      "hidden labels; mean over the seeds' base models). Per class, ordered by labeled count: "
                      "% of the class's pool images given their true label / pool images of the class / images "
                      "given that pseudo-label.", ""]
        lines.append(f"- rho_U {rho_u}: {100 * overall:.1f}% correct; per class "
                     + ", ".join(f"{100 * r:.0f}%/{int((true == c).sum())}/{g:.0f}"
                                 for c, r, g in zip(classes, recall, given)))
    return "\n".join(lines) + ("\n" if lines else "")


def _value(argv, flag):
    return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else None


if __name__ == "__main__":
    run_main(main)
