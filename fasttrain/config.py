"""One config object drives a run: defaults < preset < YAML file < command-line flags.

The resolved config is saved as `RUN/config.yaml`; `--resume RUN` reads it back.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .files import atomic_file
from .methods import METHODS, check_method


def opt(default, help: str, choices: tuple = ()):
    """A Config field with its one-line help for `--help` (and, for a fixed set of values, the choices shown
    there; the values themselves are checked where they are used)."""
    meta = {"help": help, "choices": tuple(choices)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


class ConfigError(ValueError):
    """A config value, flag or file the user can fix; the message names it and says what is valid."""


# Flags that may differ when a run is continued (they do not change what is trained).
RESUMABLE = ("resume", "stop_after_epochs", "workers", "log_every", "out", "log_with", "tracker_dir",
             "nonfinite_loss")


@dataclass
class Config:
    # data and run
    data: str = opt("", "dataset directory written by data_prep.convert")
    out: str = opt("", "run directory (config.yaml, metrics, checkpoints, model.pt)")
    method: str = opt("supervised", "what is trained", tuple(METHODS))
    loader: str = opt("ffcv", "input pipeline", ("ffcv", "dali", "torch", "device"))
    workers: int = opt(0, "loader threads/processes; 0 = this process's share of the node's cores")
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
    head: str = opt("auto", "classifier; auto = cosine with --loss ldam (the paper's rule), else linear; "
                            "cosine needs --loss ldam", ("auto", "linear", "cosine"))
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
    sync_bn: bool = opt(False, "BatchNorm -> SyncBatchNorm under DDP (for small per-GPU batches)")
    deterministic: bool = opt(False, "deterministic algorithms; cudnn.benchmark off")
    tf32: bool = opt(True, "allow TF32 matmuls / convolutions on Ampere+ GPUs")

    # loss and re-balancing
    loss: str = opt("ce", "training loss; ldam also selects the cosine head unless --head is given (the paper's "
                          "rule)", ("ce", "focal", "ldam", "balanced_softmax", "logit_adjust"))
    reweight: str = opt("none", "class re-weighting of the loss", ("none", "cb", "drw"))
    drw_at: float = opt(0.8, "DRW: class-balanced weights from this fraction of the run on (paper: 160/200)")
    drw_epoch: int = opt(-1, ">= 0: DRW from this 0-based epoch instead of --drw-at")
    cb_beta: float = opt(0.9999, "beta of the effective number (1 - beta^n) / (1 - beta): class-balanced weights "
                                 "(--reweight cb, drw) and --sampler resample")
    focal_gamma: float = opt(1.0, "focal loss gamma")
    ldam_max_margin: float = opt(0.5, "LDAM: largest margin (of the rarest class)")
    ldam_scale: float = opt(30.0, "LDAM: logit scale")
    la_tau: float = opt(1.0, "logit adjustment: tau")
    sampler: str = opt("uniform", "training sample order: uniform = shuffle; resample = the paper's Resample (each "
                                  "sample weighted by (1 - beta) / (1 - beta^n_c), beta --cb-beta); balanced = "
                                  "classes equally likely; sqrt = class ~ sqrt(n_c); class_aware = runs of "
                                  "--samples-per-class", ("uniform", "resample", "balanced", "sqrt", "class_aware"))
    samples_per_class: int = opt(4, "class_aware sampler: images of one class taken in a row (paper: 4)")
    crt_freeze_bn: bool = opt(False, "cRT: freeze BN statistics too (default: they keep updating, as the paper)")

    # self-training (semi-supervised)
    pseudo_threshold: float = opt(0.0, "pseudo-label stage: keep pool samples with confidence >= this (0 = all)")

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
    nonfinite_loss: str = opt("stop", "a NaN/inf training loss (seen at a log step): stop the run (exit 3) or "
                                      "continue", ("stop", "continue"))
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Temp name + rename: a kill never leaves a half-written config.yaml."""
        with atomic_file(path) as f:
            f.write(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        return cls().update(read_yaml(path), source=str(path))

    def update(self, values: dict[str, Any], source: str = "overrides") -> "Config":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, known, 1))
                     else repr(k) for k in unknown]
            raise ConfigError(f"{source}: unknown config key(s) {', '.join(hints)}; valid keys: {sorted(known)}")
        floats = {f.name for f in fields(self) if isinstance(f.default, float)}
        lists = {f.name for f in fields(self) if f.default_factory is not dataclasses.MISSING}  # of numbers
        values = {k: _float_or_same(v) if k in floats else
                  [_float_or_same(x) for x in v] if k in lists and isinstance(v, list) else v
                  for k, v in values.items()}
        return dataclasses.replace(self, **values)

    def changed_from(self, saved: "Config") -> list[str]:
        """Fields (other than RESUMABLE ones) whose value differs from a saved run's config. The head is compared
        as built (`--head auto` is linear unless the loss is LDAM), so a run saved with `head: linear` before
        `auto` existed continues under the same command."""
        from .models import head_for

        def value(cfg: Config, name: str):
            return head_for(cfg.head, cfg.loss) if name == "head" else getattr(cfg, name)
        return sorted(f.name for f in fields(self)
                      if f.name not in RESUMABLE and value(self, f.name) != value(saved, f.name))

    def validate(self) -> "Config":
        """Every field value checked in one place, before any work starts; raises ConfigError naming each bad
        flag and what is valid. Called by `resolve` and by `Engine.__init__`."""
        problems = []
        for f in fields(self):  # types (a YAML file can hold anything)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            value, kind = getattr(self, f.name), type(default)
            if default is None:
                continue
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
                  isinstance(value, int) and not isinstance(value, bool) if kind is int else isinstance(value, kind))
            if not ok:
                problems.append(f"{_flag(f.name)} must be {kind.__name__}, got {value!r}")
        if problems:
            raise ConfigError("; ".join(problems))
        if not self.data:
            problems.append("--data is required: a dataset directory written by `python -m data_prep.convert`")
        if not self.out:
            problems.append("--out is required: the run directory to write")
        for name, low in (("epochs", 1), ("batch_size", 1), ("grad_accum", 1), ("eval_every", 1), ("log_every", 1),
                          ("image_size", 1), ("eval_size", 1), ("samples_per_class", 1), ("workers", 0),
                          ("stop_after_epochs", 0), ("lr_ref_batch", 0), ("many_threshold", 0),
                          ("few_threshold", 0), ("lr", 0), ("momentum", 0), ("weight_decay", 0)):
            if getattr(self, name) < low:
                problems.append(f"{_flag(name)} {getattr(self, name)}: must be >= {low}"
                                + (" (0 = all cores)" if name == "workers" else ""))
        if self.width <= 0:
            problems.append(f"--width {self.width}: must be > 0")
        if not 0 <= self.cb_beta < 1:
            problems.append(f"--cb-beta {self.cb_beta} must be in [0, 1)")
        try:
            check_schedule(self)
        except ValueError as e:
            problems.append(str(e))
        for name, choices in _choices().items():
            if getattr(self, name) not in choices:
                problems.append(f"{_flag(name)}: unknown {name.replace('_', ' ')} {getattr(self, name)!r}; "
                                f"valid: {', '.join(choices)}")
        try:
            check_method(self.method)
        except ValueError as e:  # "unknown method 'x'; valid methods: [...]" from the registry itself
            problems.append(f"--method: {e}")
        if problems:
            raise ConfigError("; ".join(problems))
        return self


def _float_or_same(value):
    """YAML reads `1e-3` (no dot) as a string; float fields and the number lists take it as the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choices() -> dict[str, tuple[str, ...]]:
    """The valid values of every choice field, from the modules that implement them (one list each)."""
    from .data import KINDS
    from .data.sampling import SAMPLERS
    from .losses import LOSSES, REWEIGHTS
    from .models import ARCHS, HEAD_CHOICES
    return {"loader": tuple(KINDS), "arch": tuple(ARCHS), "head": tuple(HEAD_CHOICES),
            "loss": tuple(LOSSES), "reweight": tuple(REWEIGHTS), "sampler": tuple(SAMPLERS),
            "schedule": ("step", "cosine", "constant"), "precision": ("no", "bf16", "fp16"),
            "optimizer": ("sgd", "apex_lamb", "apex_lars"), "nonfinite_loss": ("stop", "continue")}


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file; a missing file, a syntax error (with its line) or a non-mapping is a
    ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({e})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{mark.line + 1 if mark else '?'}: invalid YAML at {where}: {problem}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys (`epochs: 200`), got {type(values).__name__}")
    return values


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
        changed = sorted(k for k, v in flags.items() if k not in RESUMABLE and getattr(cfg, k) != v)
        if changed:
            raise ConfigError(f"--resume {flags['resume']}: cannot change {changed} of a saved run "
                              f"(see {saved}); start a new run directory instead")
        return cfg.update({k: v for k, v in flags.items() if k in RESUMABLE} | {"out": flags["resume"]}).validate()
    cfg = Config().update(preset or {}, source="preset")
    if getattr(args, "config", None):
        cfg = cfg.update(read_yaml(args.config), source=args.config)
    return cfg.update(flags, source="command line").validate()
