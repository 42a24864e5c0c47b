"""One config object drives a run: defaults < preset < YAML file < command-line flags.

The resolved config is saved as `RUN/config.yaml`; `--resume RUN` reads it back.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value, flag or file the user can fix; the message names it and says what is valid."""


# Flags that may differ when a run is continued (they do not change what is trained).
RESUMABLE = ("resume", "stop_after_epochs", "workers", "log_every", "out")


@dataclass
class Config:
    # data and run
    data: str = ""                    # dataset directory written by data_prep.convert
    out: str = ""                     # run directory
    method: str = "supervised"        # supervised | crt | rotation | moco | self_training
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

    def effective_lr(self) -> float:
        return self.lr * self.batch_size / self.lr_ref_batch if self.lr_ref_batch > 0 else self.lr

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Temp name + rename: a kill never leaves a half-written config.yaml."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        os.replace(tmp, path)

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
        values = {k: _float_or_same(v) if k in floats else v for k, v in values.items()}
        return dataclasses.replace(self, **values)

    def changed_from(self, saved: "Config") -> list[str]:
        """Fields (other than RESUMABLE ones) whose value differs from a saved run's config."""
        return sorted(f.name for f in fields(self)
                      if f.name not in RESUMABLE and getattr(self, f.name) != getattr(saved, f.name))

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
                          ("image_size", 1), ("eval_size", 1), ("workers", 0), ("warmup_epochs", 0),
                          ("stop_after_epochs", 0), ("lr_ref_batch", 0), ("drw_epoch", 0), ("many_threshold", 0),
                          ("few_threshold", 0), ("lr", 0), ("momentum", 0), ("weight_decay", 0)):
            if getattr(self, name) < low:
                problems.append(f"{_flag(name)} {getattr(self, name)}: must be >= {low}"
                                + (" (0 = all cores)" if name == "workers" else ""))
        if self.width <= 0:
            problems.append(f"--width {self.width}: must be > 0")
        if not 0 <= self.cb_beta < 1:
            problems.append(f"--cb-beta {self.cb_beta} must be in [0, 1)")
        if len(self.milestones) > len(self.milestone_factors) and self.schedule == "step":
            problems.append(f"--milestones {self.milestones} needs one --milestone-factors value each, got "
                            f"{self.milestone_factors}")
        for name, choices in _choices().items():
            if getattr(self, name) not in choices:
                problems.append(f"{_flag(name)}: unknown {name.replace('_', ' ')} {getattr(self, name)!r}; "
                                f"valid: {', '.join(choices)}")
        from .methods import method_class
        try:
            method_class(self.method)
        except ValueError as e:  # "unknown method 'x'; valid methods: [...]" from the registry itself
            problems.append(f"--method: {e}")
        if problems:
            raise ConfigError("; ".join(problems))
        return self


def _float_or_same(value):
    """YAML reads `1e-3` (no dot) as a string; float fields take it as the number it spells."""
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
    from .models import ARCHS, HEADS
    return {"loader": tuple(KINDS), "arch": tuple(ARCHS), "head": tuple(HEADS),
            "loss": tuple(LOSSES), "reweight": tuple(REWEIGHTS), "sampler": tuple(SAMPLERS),
            "schedule": ("step", "cosine", "constant"), "precision": ("no", "bf16", "fp16"),
            "optimizer": ("sgd", "apex_lamb", "apex_lars")}


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
        changed = sorted(k for k, v in flags.items() if k not in RESUMABLE and getattr(cfg, k) != v)
        if changed:
            raise ConfigError(f"--resume {flags['resume']}: cannot change {changed} of a saved run "
                              f"(see {saved}); start a new run directory instead")
        return cfg.update({k: v for k, v in flags.items() if k in RESUMABLE} | {"out": flags["resume"]}).validate()
    cfg = Config().update(preset or {}, source="preset")
    if getattr(args, "config", None):
        cfg = cfg.update(read_yaml(args.config), source=args.config)
    return cfg.update(flags, source="command line").validate()
