"""--help is useful on its own: every Config flag has a help line with its choices and its default (a
recipe shows its preset's value), every command shows an example; the console scripts are the
`python -m` commands."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from fasttrain.chain import parser
from fasttrain.config import Config

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_field_has_help_text():
    missing = [f.name for f in fields(Config) if len(f.metadata.get("help", "").strip()) < 5]
    assert not missing, f"Config fields without help text (use opt(default, 'help', choices)): {missing}"


def flag_help(text: str, flag: str) -> str:
    """The help entry of one flag, joined onto one line."""
    match = re.search(rf"^  {re.escape(flag)} (.*?)(?=^  -|\Z)", text, re.M | re.S)
    assert match, f"{flag} not in the help"
    return " ".join(match.group(1).split())


def test_help_shows_choices_and_the_presets_values():
    sys.path.insert(0, str(ROOT / "recipes"))
    from presets import IMAGENET_LT
    text = parser("desc", Config().update(IMAGENET_LT)).format_help()
    assert "{ffcv,dali,torch,device}" in flag_help(text, "--loader")
    assert flag_help(text, "--arch").endswith("(default: resnet50)")
    assert "(default: 128)" in flag_help(text, "--batch-size")
    assert "(default: true)" in flag_help(text, "--channels-last")
    assert "(default: cosine)" in flag_help(text, "--schedule")
    chain = parser("desc", {"ssp": Config(method="rotation"), "ce": Config(milestones=[0.8, 0.9])}).format_help()
    assert "(default: ssp: rotation, ce: supervised)" in flag_help(chain, "--method")
    assert "(default: ssp: none, ce: 0.8,0.9)" in flag_help(chain, "--milestones")


def test_a_chains_help_says_which_stages_a_flag_reaches(capsys):
    sys.path.insert(0, str(ROOT / "recipes"))
    import semi_cifar_lt
    import ssp_cifar_lt

    from fasttrain.chain import run_chain

    def help_of(module) -> str:
        with pytest.raises(SystemExit) as stop:
            run_chain(module.STAGES, module.__doc__, ["--help"])
        assert stop.value.code == 0
        return " ".join(capsys.readouterr().out.split())
    semi = help_of(semi_cifar_lt)
    assert "a plain flag (or --config value) reaches every stage (base, pseudo, joint), except the method flags " \
           "(--loss, --head, --reweight, --sampler," in semi
    assert "which reach only joint; base keeps its preset's method: set it with --set, e.g. --set base.loss=ldam" \
           in semi
    ssp = help_of(ssp_cifar_lt)
    assert "reaches every stage (rotation, ce, ce_resample, ce_drw, ldam_drw) and overrides each stage's preset, " \
           "the method flags (--loss," in ssp


def test_help_says_that_ldam_selects_the_cosine_head_and_what_resample_is():
    text = parser("desc", Config()).format_help()
    assert "ldam also selects the cosine head unless --head is given" in flag_help(text, "--loss")
    head = flag_help(text, "--head")
    assert head.startswith("{auto,linear,cosine}") and "auto = cosine with --loss ldam" in head
    assert head.endswith("(default: auto)")
    sampler = flag_help(text, "--sampler")
    assert "{uniform,resample,balanced,sqrt,class_aware}" in sampler and "resample = the paper's Resample" in sampler
    assert "--sampler resample" in flag_help(text, "--cb-beta")


@pytest.mark.slow
def test_a_recipes_help_shows_its_preset():
    r = subprocess.run([sys.executable, "recipes/supervised_imagenet_lt.py", "--help"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert flag_help(r.stdout, "--arch").endswith("(default: resnet50)") and "examples:" in r.stdout
    assert "STR " not in r.stdout.split("config values")[1].split("--data")[0]


@pytest.mark.parametrize("name", ["fasttrain-convert", "fasttrain-evaluate", "fasttrain-report"])
def test_console_scripts_are_the_module_commands_and_show_examples(name, capsys, monkeypatch):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts[name].partition(":")
    source = (ROOT / Path(*module.split("."))).with_suffix(".py").read_text()
    # `python -m MODULE` runs what the console script runs
    assert re.search(rf'if __name__ == "__main__":\n\s+(raise SystemExit\(|sys.exit\()?{function}\(', source)
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as stop:
        result = getattr(importlib.import_module(module), function)()
        raise SystemExit(result)   # what the console-script wrapper does with a return value
    assert stop.value.code == 0
    assert "examples" in capsys.readouterr().out
