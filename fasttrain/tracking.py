"""Experiment tracking through Accelerate's trackers (TensorBoard, Weights & Biases, MLflow).

    --log-with tensorboard|wandb|mlflow|all|none (comma-separated: tensorboard,wandb)   --tracker-dir DIR

What is logged (main process only): every --log-every steps `train/loss` (mean over the epoch so far on the
main process, as the progress bar) and `train/lr`; every epoch `epoch/loss` (and the method's other losses:
epoch means over all processes), `epoch/lr`, `epoch/train_images_per_s`, `epoch/seconds` and, when the
epoch is evaluated, `eval/top1`, `eval/top5`, `eval/many`, `eval/medium`, `eval/few`; the x axis is
the global optimiser step, which a resumed run continues. The resolved config is stored as hyper-parameters.
A resumed run continues the same curves: TensorBoard drops what the interrupted attempt logged after its
last checkpoint (purge_step); wandb and MLflow reopen the same run (its id is kept in the tracker directory).
Files: TensorBoard events in TRACKER_DIR/fasttrain, wandb runs in TRACKER_DIR/wandb (WANDB_MODE=offline for
no network), MLflow in TRACKER_DIR/mlflow.db (SQLite) unless MLFLOW_TRACKING_URI names a server.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path

# tracker -> (module that must import, pip package)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
PROJECT = "fasttrain"


def tracker_names(log_with: str) -> list[str]:
    """--log-with value -> Accelerate tracker names. A requested tracker that is not installed is one clear
    error with the pip command; `all` means every one of them that is installed."""
    names = [n.strip() for n in (log_with or "none").split(",") if n.strip()]
    unknown = sorted(set(names) - set(TRACKERS) - {"none", "all"})
    if unknown:
        raise ValueError(f"--log-with {log_with}: unknown tracker(s) {unknown}; valid: none, all, "
                         f"{', '.join(TRACKERS)} (comma-separated)")
    if "all" in names:
        found = [n for n, (module, _) in TRACKERS.items() if importlib.util.find_spec(module)]
        if not found:
            raise RuntimeError("--log-with all: none of tensorboard, wandb, mlflow is installed; "
                               "pip install 'fasttrain[tracking]' (or pip install tensorboard)")
        return found
    missing = [n for n in names if n != "none" and not importlib.util.find_spec(TRACKERS[n][0])]
    if missing:
        packages = " ".join(TRACKERS[n][1] for n in missing)
        raise RuntimeError(f"--log-with {log_with}: {', '.join(missing)} is not installed; pip install {packages} "
                           f"(or pip install 'fasttrain[tracking]'), or use --log-with none")
    return [n for n in names if n != "none"]


def tracker_dir(cfg) -> Path:
    return Path(cfg.tracker_dir) if cfg.tracker_dir else Path(cfg.out) / "tracking"


def hparams(cfg) -> dict:
    """The resolved config as flat scalars (TensorBoard's hparams take no lists)."""
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in cfg.to_dict().items()}


def start(accelerator, cfg, names: list[str], step: int) -> None:
    """init_trackers on the main process, continuing the run's curves after step `step` when resumed."""
    if not names or not accelerator.is_main_process:
        return
    directory = tracker_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    run_name = Path(cfg.out).name
    ids = directory / "run_ids.json"
    known = json.loads(ids.read_text()) if ids.exists() else {}
    kwargs = {"tensorboard": {"purge_step": step + 1} if step else {}}
    if "wandb" in names:
        known.setdefault("wandb", secrets.token_hex(4))  # the run's id; a resumed run reopens it
        kwargs["wandb"] = {"name": run_name, "id": known["wandb"], "resume": "allow", "dir": str(directory)}
    if "mlflow" in names:
        import mlflow
        if "MLFLOW_TRACKING_URI" not in os.environ:  # default: an SQLite store in the tracker directory
            mlflow.set_tracking_uri(f"sqlite:///{(directory / 'mlflow.db').resolve()}")
        kwargs["mlflow"] = {"run_name": run_name, "run_id": known.get("mlflow"),
                            "logging_dir": str((directory / "mlartifacts").resolve())}
    accelerator.init_trackers(PROJECT, config=hparams(cfg) if not step else None, init_kwargs=kwargs)
    if "mlflow" in names and "mlflow" not in known:
        known["mlflow"] = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
    if known:
        ids.write_text(json.dumps(known))


def epoch_values(logs: dict, epoch: int) -> dict:
    """An epoch's record of metrics.jsonl -> tracker scalars: eval_top1 -> eval/top1, loss -> epoch/loss (the
    epoch mean over all ranks), train_images_per_s -> epoch/train_images_per_s, ...; `epoch` counts from 1
    as the training log does; a shot group without classes (None) is left out."""
    values = {(f"eval/{k[5:]}" if k.startswith("eval_") else f"epoch/{k}"): v for k, v in logs.items()
              if v is not None and k != "epoch"}
    return values | {"epoch": epoch + 1}


def finish(accelerator) -> None:
    """Close the trackers (flush files) without ending the process group (a chain's next stage needs it)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
