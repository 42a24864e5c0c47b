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


def opt(default, help: str, choices: tuple = ()):
    """A Config field with its one-line help for `--help` (and, for a fixed set of values, the choices shown
    there; the values themselves are checked where they are used)."""
    meta = {"help": help, "choices": tuple(choices)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # data and run
    data: str = opt("", "dataset directory written by data_prep.convert")
    out: str = opt("", "run directory (config.yaml, metrics, checkpoints, model.pt)")
    method: str = opt("supervised", "what is trained", ("supervised", "crt", "rotation", "moco", "self_training"))
    loader: str = opt("ffcv", "input pipeline", ("ffcv", "dali", "torch", "device"))
    workers: int = opt(0, "loader threads/processes; 0 = all cores")
    train_split: str = opt("train", "split to train on")
    eval_split: str = opt("", "split that picks the best epoch; empty = val if present, else test")
    image_size: int = opt(224, "training crop size for jpeg sets (raw small-image sets keep their size)")
    eval_size: int = opt(224, "evaluation crop size for jpeg sets")
    color_jitter: float = opt(0.0, "jpeg training crops: brightness/contrast/saturation jitter (ImageNet-LT: 0.4)")
    seed: int = opt(0, "seed of the model init, the sample order and the augmentation")

    # model
    arch: str = opt("resnet32", "network", ("resnet20", "resnet32", "resnet44", "resnet56", "resnet10", "resnet18",
                                            "resnet50"))
    width: float = opt(1.0, "channel width multiplier (resnet20/32/44/56 only)")
    head: str = opt("linear", "classifier; cosine needs --loss ldam", ("linear", "cosine"))
    pretrained: str = opt("", "backbone to start from (SSP backbone.pt, MoCo or torchvision file)")

    # optimisation
    epochs: int = opt(200, "training epochs")
    batch_size: int = opt(128, "global batch size, over all processes")
    lr: float = opt(0.1, "peak learning rate")
    lr_ref_batch: int = opt(0, ">0: --lr is given for this batch and scaled linearly to batch-size x grad-accum")
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(False, "Nesterov momentum")
    weight_decay: float = opt(2e-4, "weight decay")
    schedule: str = opt("step", "learning-rate schedule after the warm-up", ("step", "cosine", "constant"))
    # Schedule positions are fractions of the run (--epochs), so a shorter run keeps the paper's shape;
    # each has an absolute override in epochs (*_epochs, -1 / empty = use the fraction).
    warmup: float = opt(0.0, "linear warm-up length, fraction of the run (paper CIFAR: 5/200 = 0.025)")
    warmup_epochs: int = opt(-1, ">= 0: warm-up length in epochs instead of --warmup")
    milestones: list = opt([], "step schedule: lr milestones as fractions of the run (paper: 0.8,0.9)")
    milestone_epochs: list = opt([], "step schedule: milestones in absolute epochs instead (overrides --milestones)")
    milestone_factors: list = opt([], "step schedule: lr factor from each milestone on, comma-separated")
    lr_update: str = opt("epoch_end", "when the lr changes: once per epoch e (1-based) at e/T (paper), at (e-1)/T "
                                      "(MoCo v2), or every step", ("epoch_end", "epoch_start", "step"))
    optimizer: str = opt("sgd", "optimiser (apex_* need NVIDIA apex installed)", ("sgd", "apex_lamb", "apex_lars"))
    grad_accum: int = opt(1, "gradient accumulation steps")
    precision: str = opt("no", "mixed precision", ("no", "bf16", "fp16"))
    channels_last: bool = opt(False, "channels_last memory format")
    compile: bool = opt(False, "torch.compile the model")

    # loss and re-balancing
    loss: str = opt("ce", "training loss", ("ce", "focal", "ldam", "balanced_softmax", "logit_adjust"))
    reweight: str = opt("none", "class re-weighting of the loss", ("none", "cb", "drw"))
    drw_at: float = opt(0.8, "DRW: class-balanced weights from this fraction of the run on (paper: 160/200)")
    drw_epoch: int = opt(-1, ">= 0: DRW from this 0-based epoch instead of --drw-at")
    cb_beta: float = opt(0.9999, "class-balanced weights: beta of the effective number")
    focal_gamma: float = opt(1.0, "focal loss gamma")
    ldam_max_margin: float = opt(0.5, "LDAM: largest margin (of the rarest class)")
    ldam_scale: float = opt(30.0, "LDAM: logit scale")
    la_tau: float = opt(1.0, "logit adjustment: tau")
    sampler: str = opt("uniform", "training sample order", ("uniform", "balanced", "sqrt", "class_aware"))
    samples_per_class: int = opt(4, "class_aware sampler: images of one class taken in a row (paper: 4)")
    crt_freeze_bn: bool = opt(False, "cRT: freeze BN statistics too (default: they keep updating, as the paper)")

    # self-training (semi-supervised)
    pseudo_labels: str = opt("", "pseudo_labels.npz written by the pseudo-label stage")
    pseudo_weight: float = opt(1.0, "weight of the pseudo-labeled loss")
    pseudo_share: float = opt(0.5, "share of each batch taken from the pseudo-labeled pool")
    pseudo_threshold: float = opt(0.0, "keep pseudo-labels with confidence >= this")

    # self-supervised pre-training
    moco_dim: int = opt(128, "MoCo: embedding dimension")
    moco_queue: int = opt(65536, "MoCo: queue length")
    moco_momentum: float = opt(0.999, "MoCo: key-encoder momentum")
    moco_temperature: float = opt(0.2, "MoCo: softmax temperature")
    moco_mlp: bool = opt(True, "MoCo v2: MLP projection head")
    moco_shuffle_groups: int = opt(8, "MoCo on one process: shuffle BN emulated with this many sub-batches")

    # evaluation
    many_threshold: int = opt(100, "many-shot classes: more than this many training images")
    few_threshold: int = opt(20, "few-shot classes: fewer than this many training images")
    eval_every: int = opt(1, "evaluate every this many epochs (the last epoch always)")

    # run management
    resume: str = opt("", "run directory to continue from its last checkpoint")
    stop_after_epochs: int = opt(0, ">0: end cleanly after this many epochs (for time-limited jobs that requeue)")
    log_every: int = opt(50, "steps between progress-bar and tracker step logs")
    log_with: str = opt("none", "experiment trackers (Accelerate's), comma-separated or all",
                        ("none", "tensorboard", "wandb", "mlflow", "all"))
    tracker_dir: str = opt("", "tracker files (TensorBoard events, wandb offline runs, mlflow store); "
                               "empty = RUN/tracking")

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


def add_config_args(parser: argparse.ArgumentParser, defaults: Config | dict[str, Config] | None = None) -> None:
    """Every Config field becomes a flag (`--batch-size 256`) with its help line, its choices and its default
    (`defaults`: the recipe's preset, so `--help` shows what the recipe would use; a chain gives one Config
    per stage and values that differ are shown per stage). Parsed defaults are None (= not given), so
    resolve() can tell a given flag from a default."""
    per_stage = defaults if isinstance(defaults, dict) else {"": defaults or Config()}
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="YAML file with config values (below --resume and the flags, above the preset)")
    group = parser.add_argument_group("config values (any of them can also be set in --config FILE.yaml)")
    for f in fields(Config):
        kind = type(Config().__getattribute__(f.name))
        parse = {bool: _parse_bool, list: _parse_list}.get(kind, kind)
        choices = f.metadata.get("choices") or (("true", "false") if kind is bool else ())
        metavar = ("{" + ",".join(choices) + "}" if choices else _PATH_METAVARS.get(f.name)
                   or {list: "A,B,...", int: "N", float: "X"}.get(kind, "STR"))
        values = {stage: _show(getattr(cfg, f.name)) for stage, cfg in per_stage.items()}
        shown = (next(iter(values.values())) if len(set(values.values())) == 1
                 else ", ".join(f"{stage}: {v}" for stage, v in values.items()))
        help_text = f"{f.metadata.get('help', '')} (default: {shown})".replace("%", "%%")
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=parse, default=None,
                           metavar=metavar, help=help_text)


_PATH_METAVARS = {"data": "DIR", "out": "RUN", "resume": "RUN", "pretrained": "FILE", "pseudo_labels": "FILE",
                  "tracker_dir": "DIR"}


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, bool):
        return str(value).lower()
    return "empty" if value == "" else str(value)


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
        allowed = {"resume", "stop_after_epochs", "workers", "log_every", "out", "log_with", "tracker_dir"}
        changed = {k for k, v in flags.items() if k not in allowed and getattr(cfg, k) != v}
        if changed:
            raise ValueError(f"--resume {flags['resume']}: cannot change {sorted(changed)} of a saved run "
                             f"(see {saved}); start a new run directory instead")
        return cfg.update({k: v for k, v in flags.items() if k in allowed} | {"out": flags["resume"]})
    cfg = Config().update(preset or {}, source="preset")
    if getattr(args, "config", None):
        cfg = cfg.update(yaml.safe_load(Path(args.config).read_text()) or {}, source=args.config)
    return cfg.update(flags, source="command line")
