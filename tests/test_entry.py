"""How a fasttrain process ends (fasttrain/entry.py): exit codes, one process and several, and the gloo race
that ending without finalisation removes."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import launch_two_processes
from fasttrain import entry
from fasttrain.chain import user_errors
from fasttrain.stopping import EXIT_INTERRUPTED

ROOT = Path(__file__).resolve().parents[1]
RACE = ROOT / "tests" / "scripts" / "gloo_exit_race.py"


@pytest.mark.slow
def test_a_rank_exiting_normally_loses_the_gloo_race_and_end_process_does_not():
    """Catches: end_process exiting through the interpreter (sys.exit / a plain return) under several processes.
    The staged race first aborts a normal exit, as in the failed CI run, so the check below is not vacuous."""
    plain = launch_two_processes(RACE, "plain", timeout=120, check=False)
    log = plain.stdout + plain.stderr
    assert plain.returncode != 0 and "terminate called without an active exception" in log, log[-3000:]
    assert "rank 0: all-reduce completed" in log      # rank 1's worker really finished the all-reduce
    ended = launch_two_processes(RACE, "entry", timeout=120, check=False)
    log = ended.stdout + ended.stderr
    assert ended.returncode == 0, log[-3000:]
    assert "rank 1 ending" in log and "terminate called" not in log


class Exited(Exception):
    def __init__(self, code):
        self.code = code


@pytest.fixture
def several_processes(monkeypatch):
    """WORLD_SIZE=2 with os._exit recorded instead of taken; the flushes are recorded too."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    calls = []

    def fake_exit(code):
        calls.append(("exit", code))
        raise Exited(code)

    monkeypatch.setattr(entry.os, "_exit", fake_exit)
    monkeypatch.setattr(entry.logging, "shutdown", lambda: calls.append(("logging",)))
    return calls


@pytest.mark.parametrize("main, code", [
    (lambda: "done", 0),                                   # a recipe's status
    (lambda: 0, 0), (lambda: 2, 2),                        # evaluate's return code
    (lambda: (_ for _ in ()).throw(SystemExit(EXIT_INTERRUPTED)), EXIT_INTERRUPTED),
    (lambda: (_ for _ in ()).throw(SystemExit(None)), 0),
    (lambda: (_ for _ in ()).throw(KeyError("boom")), 1),  # an uncaught exception: its traceback, then 1
])
def test_several_processes_end_with_os_exit_and_the_right_code(several_processes, capsys, main, code):
    """Catches: codes lost on the os._exit path (75 -> 0, an exception -> 0), a missing logging flush."""
    with pytest.raises(Exited) as e:
        entry.run_main(main)
    assert e.value.code == code
    assert several_processes == [("logging",), ("exit", code)]
    if code == 1:
        assert "KeyError: 'boom'" in capsys.readouterr().err


def test_user_errors_codes_reach_os_exit(several_processes, capsys):
    """A recipe's mistake (user_errors: exit 2 and one line) keeps its code on the several-process path."""
    @user_errors
    def recipe():
        raise FileNotFoundError("/data/x: no such dataset")

    with pytest.raises(Exited) as e:
        entry.run_main(recipe)
    assert e.value.code == 2 and "error: /data/x: no such dataset" in capsys.readouterr().err


def test_one_process_exits_through_the_interpreter(monkeypatch):
    """Catches: os._exit taken by a single process (it would end a test session that runs a recipe in-process)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(entry.os, "_exit", lambda code: pytest.fail("os._exit in a single process"))
    with pytest.raises(SystemExit) as e:
        entry.run_main(lambda: 75)
    assert e.value.code == 75
    with pytest.raises(KeyError):   # an uncaught exception propagates unchanged
        entry.run_main(lambda: {}["missing"])


ENTRY_POINTS = [*sorted((ROOT / "recipes").glob("*.py")), ROOT / "fasttrain" / "evaluate.py",
                *sorted((ROOT / "tests" / "scripts").glob("*.py"))]


@pytest.mark.parametrize("path", ENTRY_POINTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_entry_point_ends_through_fasttrain_entry(path):
    """Catches: a recipe or launched script whose process ends by a normal interpreter exit (the race)."""
    tree = ast.parse(path.read_text())
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    main_blocks = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    if path.parent.name == "recipes" and not main_blocks:
        assert path.name == "presets.py"   # the only recipe module that is not a command
        return
    assert calls & {"run_main", "end_process"}, f"{path} does not end through fasttrain.entry"
    enders = {"run_main"} | {f.name for f in tree.body if isinstance(f, ast.FunctionDef)
                             and "run_main(" in ast.unparse(f)}          # e.g. evaluate's cli()
    for block in main_blocks:
        called = {n.func.id for n in ast.walk(block) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert called & enders, f"{path}: its __main__ block does not end through run_main"
