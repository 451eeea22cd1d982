"""The README's CPU quick start, run top to bottom as a new user runs it in a fresh clone: every command succeeds.

Each line of its first ```bash block is run in-process (the same `main` as `python <script>.py`, through run_cli),
in an empty folder, with two stand-ins so that the block takes seconds instead of minutes: the digits prior is the
exact denoiser of 20 real digits per class (its samples are real digits; no 4000-step training), and every student
trains 10 epochs instead of 300. Nothing else is changed: the flags, the folders and their order are the README's.
"""
import os
import re
import shlex


import bench
import curriculum
import distill
import evaluate
import preflight
import results
import train_prior
import train_student
from conftest import REPO, cli, make_empirical_prior

MAINS = {"distill.py": distill.main, "evaluate.py": evaluate.main, "results.py": results.main,
         "train_prior.py": train_prior.main, "bench.py": bench.main}


def quick_start_commands():
    text = open(os.path.join(REPO, "README.md")).read()
    block = re.search(r"## CPU quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.split("#")[0].strip()]


def test_the_quick_start_block_is_what_this_test_runs():
    commands = quick_start_commands()
    assert commands[0] == ["python", "distill.py"] and len(commands) >= 5
    assert all(c[0] == "python" and c[1] in MAINS for c in commands)


def test_the_readme_quick_start_runs_top_to_bottom_in_a_fresh_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(distill, "digits_prior", lambda *a, **k: "the embedded prior (a stand-in here)")
    monkeypatch.setattr(distill, "load_prior", lambda *a, **k: make_empirical_prior())
    short = lambda ipc, recipe="minimax", dataset=None: 10  # noqa: E731
    for module in (curriculum, evaluate, preflight, train_student):
        monkeypatch.setattr(module, "epochs_for_ipc", short)
    for command in quick_start_commands():
        out = []
        code, lines = cli(MAINS[command[1]], command[2:], capsys, out)
        assert code == 0, (command, lines[-3:])
    assert os.path.exists(tmp_path / "out" / "digits_lgd_ipc10_seed0" / "eval.json")
    assert os.path.exists(tmp_path / "out" / "digits_lgd_ipc10_seed0" / "preflight.json")
