"""One config object drives a run: defaults < preset < YAML file < command-line flags.

The resolved config is saved as `RUN/config.yaml`; `--resume RUN` reads it back.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Config:
    # data and run
    data: str = ""                    # dataset directory written by data_prep.convert
    out: str = ""                     # run directory
    method: str = "supervised"        # supervised | crt | rotation | moco | self_training
    loader: str = "ffcv"              # ffcv | dali | torch | device
    workers: int = 0                  # loader threads/processes; 0 = all cores
    train_split: str = "train"
    eval_split: str = ""              # split that picks the best epoch; "" = val if present, else test
    image_size: int = 224             # train crop for jpeg sets (raw sets keep their size)
    eval_size: int = 224
    color_jitter: float = 0.0         # jpeg train crops: brightness/contrast/saturation jitter (ImageNet-LT: 0.4)
    seed: int = 0

    # model
    arch: str = "resnet32"
    width: float = 1.0                # resnet32 family only
    head: str = "linear"              # linear | cosine
    pretrained: str = ""              # backbone to start from (SSP output, MoCo or torchvision file)

    # optimisation
    epochs: int = 200
    batch_size: int = 128             # global, over all processes
    lr: float = 0.1
    lr_ref_batch: int = 0             # >0: --lr is for this batch; scaled linearly to batch_size x grad_accum
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4
    schedule: str = "step"            # step | cosine | constant
    # Schedule positions are fractions of the run (--epochs), so a shorter run keeps the paper's shape;
    # each has an absolute override in epochs (*_epochs, -1 / empty = use the fraction).
    warmup: float = 0.0               # linear warm-up length, fraction of the run (paper CIFAR: 5/200 = 0.025)
    warmup_epochs: int = -1           # >= 0: warm-up length in epochs instead of --warmup
    milestones: list = field(default_factory=list)     # step schedule: fractions of the run (paper: 0.8, 0.9) ...
    milestone_epochs: list = field(default_factory=list)  # ... or absolute epochs instead (overrides --milestones)
    milestone_factors: list = field(default_factory=list)  # ... and the lr factor after each one
    lr_update: str = "epoch_end"      # lr set once per epoch e (1-based) at e/T (paper) | epoch_start: (e-1)/T (MoCo v2) | step
    optimizer: str = "sgd"            # sgd | apex_lamb | apex_lars (NVIDIA apex, only when installed)
    grad_accum: int = 1
    precision: str = "no"             # no | bf16 | fp16
    channels_last: bool = False
    compile: bool = False

    # loss and re-balancing
    loss: str = "ce"                  # ce | focal | ldam | balanced_softmax | logit_adjust
    reweight: str = "none"            # none | cb | drw
    drw_at: float = 0.8               # DRW: class-balanced weights from this fraction of the run on (paper: 160/200)
    drw_epoch: int = -1               # >= 0: from this 0-based epoch instead of --drw-at
    cb_beta: float = 0.9999
    focal_gamma: float = 1.0
    ldam_max_margin: float = 0.5
    ldam_scale: float = 30.0
    la_tau: float = 1.0
    sampler: str = "uniform"          # uniform | balanced | sqrt | class_aware
    samples_per_class: int = 4        # class_aware sampler: images of one class taken in a row (paper: 4)
    crt_freeze_bn: bool = False       # cRT: freeze BN statistics too (default: they keep updating, as the paper)

    # self-training (semi-supervised)
    pseudo_labels: str = ""           # pseudo_labels.npz written by fasttrain.methods.self_training
    pseudo_weight: float = 1.0        # weight of the pseudo-labeled loss
    pseudo_share: float = 0.5         # share of each batch taken from the pseudo-labeled pool
    pseudo_threshold: float = 0.0     # keep pseudo-labels with confidence >= this

    # self-supervised pre-training
    moco_dim: int = 128
    moco_queue: int = 65536
    moco_momentum: float = 0.999
    moco_temperature: float = 0.2
    moco_mlp: bool = True
    moco_shuffle_groups: int = 8      # one process: shuffle BN emulated with this many sub-batches

    # evaluation
    many_threshold: int = 100         # many-shot: > this many training images
    few_threshold: int = 20           # few-shot: < this many
    eval_every: int = 1               # epochs; the last epoch is always evaluated

    # run management
    resume: str = ""                  # run directory to continue
    stop_after_epochs: int = 0        # >0: end cleanly after this many epochs (requeue-friendly)
    log_every: int = 50               # steps between progress-bar / jsonl step logs

    def optimizer_batch(self) -> int:
        """Images per optimiser step: the global batch times gradient accumulation."""
        return self.batch_size * self.grad_accum

    def effective_lr(self) -> float:
        """--lr, scaled linearly from --lr-ref-batch to the optimiser batch when --lr-ref-batch > 0."""
        return self.lr * self.optimizer_batch() / self.lr_ref_batch if self.lr_ref_batch > 0 else self.lr

    def schedule_epochs(self) -> dict:
        """This run's warm-up length, step milestones and DRW switch, in epochs (floats; DRW: the first 0-based
        epoch with class-balanced weights). Fractions (--warmup, --milestones, --drw-at) are of --epochs; the
        *_epochs overrides are absolute. The paper's CIFAR schedule (0.025, [0.8, 0.9], 0.8) at 200 epochs
        gives warm-up 5, milestones 160 and 180, DRW from epoch 160; at 20 epochs 0.5, 16 and 18, and 16."""
        n = self.epochs
        warmup = self.warmup_epochs if self.warmup_epochs >= 0 else self.warmup * n
        milestones = self.milestone_epochs if self.milestone_epochs else [m * n for m in self.milestones]
        drw = self.drw_epoch if self.drw_epoch >= 0 else math.ceil(round(self.drw_at * n, 9))
        return {"warmup": round(float(warmup), 9), "milestones": [round(float(m), 9) for m in milestones],
                "drw": int(drw)}

    def validate(self) -> "Config":
        """One clear ValueError (naming the flag) for values the engine cannot run with."""
        check_schedule(self)
        if self.samples_per_class < 1:
            raise ValueError(f"--samples-per-class {self.samples_per_class}: must be >= 1")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        return cls().update(yaml.safe_load(Path(path).read_text()) or {}, source=str(path))

    def update(self, values: dict[str, Any], source: str = "overrides") -> "Config":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown config key(s) {unknown}; valid keys: {sorted(known)}")
        return dataclasses.replace(self, **values)


LR_UPDATES = ("epoch_end", "epoch_start", "step")


def check_schedule(cfg: Config) -> None:
    def fraction(flag, value, absolute):
        if not 0 <= value <= 1:
            raise ValueError(f"--{flag} {value}: a fraction of the run in [0, 1] is expected (e.g. 0.8 = 160 of 200 "
                             f"epochs); for absolute epochs use --{absolute}")
    fraction("warmup", cfg.warmup, "warmup-epochs")
    fraction("drw-at", cfg.drw_at, "drw-epoch")
    for m in cfg.milestones:
        if not isinstance(m, (int, float)) or not 0 <= m <= 1:
            raise ValueError(f"--milestones {','.join(map(str, cfg.milestones))}: fractions of the run in [0, 1] "
                             f"are expected (paper: 0.8,0.9); for absolute epochs use --milestone-epochs "
                             f"{','.join(map(str, cfg.milestones))}")
    given = cfg.milestone_epochs or cfg.milestones
    if cfg.schedule == "step" and len(given) > len(cfg.milestone_factors):
        raise ValueError(f"--milestone-factors needs a factor for every milestone: {len(given)} milestone(s) "
                         f"{given}, {len(cfg.milestone_factors)} factor(s) {cfg.milestone_factors}")
    if cfg.lr_update not in LR_UPDATES:
        raise ValueError(f"--lr-update {cfg.lr_update!r}: valid values are {', '.join(LR_UPDATES)}")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_list(text: str) -> list:
    return [yaml.safe_load(v) for v in text.split(",") if v.strip()]


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Every Config field becomes a flag (`--batch-size 256`); defaults are None = not given."""
    parser.add_argument("--config", default=None, help="YAML file with config values")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = type(Config().__getattribute__(f.name))
        parse = {bool: _parse_bool, list: _parse_list}.get(kind, kind)
        parser.add_argument(flag, dest=f.name, type=parse, default=None, metavar=kind.__name__.upper())


def resolve(args: argparse.Namespace, preset: dict | None = None) -> Config:
    """defaults < preset < --config YAML < explicit flags. `--resume RUN` reloads RUN/config.yaml."""
    flags = {k: v for k, v in vars(args).items() if v is not None and k in {f.name for f in fields(Config)}}
    if flags.get("resume"):
        saved = Path(flags["resume"]) / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume {flags['resume']}: {saved} not found; is this a fasttrain run "
                                    f"directory?")
        cfg = Config.load(saved)
        # on resume only run-management flags may change; anything else would silently change the run
        allowed = {"resume", "stop_after_epochs", "workers", "log_every", "out"}
        changed = {k for k, v in flags.items() if k not in allowed and getattr(cfg, k) != v}
        if changed:
            raise ValueError(f"--resume {flags['resume']}: cannot change {sorted(changed)} of a saved run "
                             f"(see {saved}); start a new run directory instead")
        return cfg.update({k: v for k, v in flags.items() if k in allowed} | {"out": flags["resume"]})
    cfg = Config().update(preset or {}, source="preset")
    if getattr(args, "config", None):
        cfg = cfg.update(yaml.safe_load(Path(args.config).read_text()) or {}, source=args.config)
    return cfg.update(flags, source="command line")
