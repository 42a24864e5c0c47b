"""Recipes: a single training run, or a chain of stages (SSP -> supervised -> cRT, base -> pseudo-label ->
joint), each stage in its own sub-directory of `--out`. Running the same command again skips finished
stages (DONE) and resumes the unfinished one from its last checkpoint, so chains survive requeues.

    python recipes/ssp_cifar_lt.py --data DATA --out RUN [--epochs 50] [--set ce.lr=0.05] [--stages ssp,ce]
"""
from __future__ import annotations

import argparse
import functools
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import Config, add_config_args, resolve

# What a stage trains with: loss, head, re-weighting, sampler and their parameters.
METHOD_KEYS = ("loss", "head", "reweight", "sampler", "drw_at", "drw_epoch", "cb_beta", "focal_gamma",
               "ldam_max_margin", "ldam_scale", "la_tau", "samples_per_class")


@dataclass
class Stage:
    """One step of a recipe. `kind` is "train" (an Engine run) or "pseudo_label" (label the unlabeled pool
    with the model of the run `source` and write STAGE/data: labeled + pseudo-labeled, see
    fasttrain/pseudo_label.py). `data`, when set, is the stage's dataset (it wins over --data), e.g. the
    joint stage's `"{root}/pseudo/data"`. Strings may name the chain's directory as `{root}` and the chain's
    --data as `{data}`, e.g. `"pretrained": "{root}/ssp/backbone.pt"`.

    Scope of the chain's flags: a plain flag (or a --config value) reaches every stage, except that a stage
    with `method_flags=False` (self-training's base model) keeps its preset's METHOD_KEYS whatever the plain
    flags say; `--set STAGE.KEY=VALUE` sets any value of one stage."""
    name: str
    preset: dict = field(default_factory=dict)
    kind: str = "train"
    source: str = ""
    data: str = ""
    method_flags: bool = True


def parser(description: str, defaults=None, epilog: str | None = None) -> argparse.ArgumentParser:
    """The recipe's parser; `defaults` (the preset as a Config, or {stage: Config}) are the values --help shows."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith(".py") else "RECIPE.py"
    epilog = epilog or (f"examples:\n  python recipes/{prog} --data DATA --out RUN --seed 1 --epochs 10\n"
                        f"  accelerate launch recipes/{prog} --data DATA --out RUN --log-with tensorboard\n"
                        f"  python recipes/{prog} --resume RUN          # continue an interrupted run")
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                usage="%(prog)s --data DIR --out RUN [--config FILE.yaml] [--KEY VALUE ...]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, defaults)
    return p


def user_errors(main):
    """Configuration and data mistakes end a recipe with one clear line (exit code 2), not a traceback; so does
    a diverged run (exit code 3). A run stopped by SIGTERM / SIGUSR1 exits with 75 (fasttrain/stopping.py)."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        from .stopping import EXIT_DIVERGED, EXIT_INTERRUPTED, Diverged
        try:
            status = main(*args, **kwargs)
        except Diverged as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_DIVERGED) from None
        except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        if status == "interrupted":
            raise SystemExit(EXIT_INTERRUPTED)
        return status
    return wrapper


@user_errors
def run_single(preset: dict, description: str, argv=None) -> str:
    """A one-stage recipe: defaults < preset < --config < flags; `--resume RUN` continues a run."""
    args = parser(description, Config().update(preset, source="preset")).parse_args(argv)
    cfg = resolve(args, preset)
    from .engine import Engine
    engine = Engine(cfg)
    status = engine.fit()
    _end(engine.accelerator)
    return status


def flag_scope(stages: list[Stage]) -> str:
    """The paragraph of a chain's --help that says which stages a plain flag reaches."""
    names = [s.name for s in stages]
    method = [s.name for s in stages if s.method_flags]
    flags = "--" + ", --".join(k.replace("_", "-") for k in METHOD_KEYS)
    every = f"Which stages a flag reaches: a plain flag (or --config value) reaches every stage ({', '.join(names)})"
    if len(method) == len(stages):
        text = f"{every} and overrides each stage's preset, the method flags ({flags}) too; --set STAGE.KEY=VALUE " \
               f"sets one stage."
    else:
        keep = [s.name for s in stages if s.kind == "train" and not s.method_flags]
        text = f"{every}, except the method flags ({flags}), which reach only {', '.join(method)}; " \
               f"{', '.join(keep)} keeps its preset's method: set it with --set, e.g. --set {keep[0]}.loss=ldam."
    return textwrap.fill(text, 110, break_on_hyphens=False)


@user_errors
def run_chain(stages: list[Stage], description: str, argv=None) -> str:
    p = parser(description.rstrip() + "\n\n" + flag_scope(stages),
               {s.name: Config().update(s.preset, source=f"stage {s.name}") for s in stages})
    p.add_argument("--stages", default=None, metavar="A,B", help="comma-separated subset of stages to run "
                   "(default: all, in order: " + ",".join(s.name for s in stages) + ")")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override one config value of one stage, e.g. --set ce.lr=0.05 (repeatable; default: none)")
    args = p.parse_args(argv)
    root = Path(args.resume or args.out or "")
    if not str(root):
        p.error("give the chain's run directory with --out RUN_DIR (or --resume RUN_DIR)")
    args.resume = None  # a chain resumes each stage by itself
    per_stage = _parse_sets(args.set, {s.name for s in stages})
    chosen = set(args.stages.split(",")) if args.stages else {s.name for s in stages}
    unknown = chosen - {s.name for s in stages}
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}; this recipe has {[s.name for s in stages]}")

    chain_data = args.data

    def stage_config(stage: Stage) -> Config:
        names = dict(root=root, data=chain_data)
        preset = {k: (v.format(**names) if isinstance(v, str) else v) for k, v in stage.preset.items()}
        args.out, args.data = str(root / stage.name), stage.data.format(**names) if stage.data else chain_data
        cfg = resolve(args, preset)
        if not stage.method_flags:  # plain flags and --config values do not change how this stage trains
            own = Config().update(preset, source=f"stage {stage.name}")
            cfg = cfg.update({k: getattr(own, k) for k in METHOD_KEYS})
        return cfg.update(per_stage.get(stage.name, {}), source=f"--set {stage.name}.*")

    for stage in stages:  # every chosen stage's config is checked before the first stage starts
        if stage.name in chosen:
            stage_config(stage).validate()

    status, accelerator = "done", None
    for stage in stages:
        if stage.name not in chosen:
            continue
        stage_dir = root / stage.name
        names = dict(root=root, data=chain_data)
        cfg = stage_config(stage)
        if stage.kind == "pseudo_label":
            accelerator = _accelerator(cfg)
            if (stage_dir / "data" / "manifest.json").exists():
                _print(f"stage {stage.name}: already done ({stage_dir})")
                continue
            from .pseudo_label import pseudo_label, write_pseudo_dataset
            _print(f"stage {stage.name} -> {stage_dir}")
            t0 = time.perf_counter()
            table = pseudo_label(Path(stage.source.format(**names)), Path(cfg.data), stage_dir, loader=cfg.loader,
                                 batch_size=cfg.batch_size, threshold=cfg.pseudo_threshold, accelerator=accelerator,
                                 workers=cfg.workers)
            if accelerator.is_main_process:
                write_pseudo_dataset(cfg.data, table, stage_dir / "data", threshold=cfg.pseudo_threshold,
                                     workers=cfg.workers or None)
            accelerator.wait_for_everyone()
            _print(f"stage {stage.name}: {time.perf_counter() - t0:.0f} s")
            continue
        if (stage_dir / "DONE").exists():
            _print(f"stage {stage.name}: already done ({stage_dir})")
            continue
        if (stage_dir / "checkpoints").exists():
            cfg = cfg.update({"resume": str(stage_dir)})
        _print(f"stage {stage.name} -> {stage_dir}")
        from .engine import Engine
        t0 = time.perf_counter()
        engine = Engine(cfg)
        accelerator = engine.accelerator
        status = engine.fit()
        del engine
        _print(f"stage {stage.name}: {time.perf_counter() - t0:.0f} s")
        if status in ("stopped", "interrupted"):
            _print(f"chain paused in stage {stage.name}; run the same command again to continue")
            break
    if accelerator is not None:
        _end(accelerator)
    return status


def _parse_sets(items: list[str], stage_names: set[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        stage, _, name = key.partition(".")
        if not value or not name or stage not in stage_names:
            raise SystemExit(f"--set {item!r}: expected STAGE.KEY=VALUE with STAGE in {sorted(stage_names)}")
        out.setdefault(stage, {})[name.replace("-", "_")] = yaml.safe_load(value)
    for stage, values in out.items():
        Config().update(values, source=f"--set {stage}.*")
    return out


def _accelerator(cfg: Config):
    from accelerate import Accelerator
    return Accelerator(mixed_precision=cfg.precision)


def _end(accelerator) -> None:
    accelerator.wait_for_everyone()
    accelerator.end_training()


def process_state():
    """Accelerate's process state, before any Accelerator exists. A bare `PartialState()` ignores
    ACCELERATE_USE_CPU (only Accelerator reads it) and would pin a multi-CPU launch to one process."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _print(message: str) -> None:
    if process_state().is_main_process:
        print(f"[fasttrain] {message}", flush=True)
