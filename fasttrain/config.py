"""One config object drives a run: defaults < preset < YAML file < command-line flags.

The resolved config is saved as `RUN/config.yaml`; `--resume RUN` reads it back.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Config:
    # data and run
    data: str = ""                    # dataset directory written by data_prep.convert
    out: str = ""                     # run directory
    method: str = "supervised"        # supervised | crt | rotation | moco
    loader: str = "ffcv"              # ffcv | dali | torch | device
    workers: int = 0                  # loader threads/processes; 0 = all cores
    train_split: str = "train"
    eval_split: str = ""              # "" = test if present, else val
    image_size: int = 224             # train crop for jpeg sets (raw sets keep their size)
    eval_size: int = 224
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
    lr_ref_batch: int = 0             # >0: lr is given for this batch size and scaled linearly
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4
    schedule: str = "step"            # step | cosine | constant
    warmup_epochs: int = 0
    milestones: list = field(default_factory=list)     # step schedule: epochs ...
    milestone_factors: list = field(default_factory=list)  # ... and the lr factor from each on
    optimizer: str = "sgd"            # sgd | apex_lamb | apex_lars (NVIDIA apex, only when installed)
    grad_accum: int = 1
    precision: str = "no"             # no | bf16 | fp16
    channels_last: bool = False
    compile: bool = False

    # loss and re-balancing
    loss: str = "ce"                  # ce | focal | ldam | balanced_softmax | logit_adjust
    reweight: str = "none"            # none | cb | drw
    drw_epoch: int = 160
    cb_beta: float = 0.9999
    focal_gamma: float = 1.0
    ldam_max_margin: float = 0.5
    ldam_scale: float = 30.0
    la_tau: float = 1.0
    sampler: str = "uniform"          # uniform | balanced | sqrt

    # self-training (semi-supervised)
    pseudo_threshold: float = 0.0     # pseudo-label stage: keep pool samples with confidence >= this (0 = all)

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

    def effective_lr(self) -> float:
        return self.lr * self.batch_size / self.lr_ref_batch if self.lr_ref_batch > 0 else self.lr

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
