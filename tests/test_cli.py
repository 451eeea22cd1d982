"""The command lines as a user meets them: every flag of every CLI checked before any work (one `error:` line, exit 1),
the dry run, Ctrl-C, bench, and the README's quick start run top to bottom."""
import json
import os
import re
import shlex

import pytest
import torch

import bench
import curriculum
import distill
import evaluate
import reference
import train_prior
import train_student as ts
from conftest import (
    FIELD_WOOF,
    FIELD_WOOF_IDS,
    FIELD_WOOF_NAMES,
    REPO,
    cli,
    in_process,
    make_empirical_prior,
    one_error_line,
    run_signalled,
    tree,
)
from data import get_spec
from ground.common import UserError
from model import make_student
from tools import export, preflight, results


@pytest.mark.parametrize("main,argv,fragment", [
    (results.main, ["ablation", "--jobs", "0"], "--jobs must be at least 1, got 0"),
    (results.main, ["ablation", "--jobs", "-3"], "--jobs must be at least 1, got -3"),
    (results.main, ["nosuchtable"], "invalid choice: 'nosuchtable'"),
    (train_prior.main, ["--per-class", "0"], "--per-class must be at least 1, got 0"),
    (train_prior.main, ["--per-class", "-5"], "--per-class must be at least 1, got -5"),
    (train_prior.main, ["--cfg-scale", "nan"], "--cfg-scale must be a finite number >= 1, got nan"),
    (bench.main, ["--batch-size", "0"], "--batch-size must be at least 1"),
    (bench.main, ["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (bench.main, ["--size", "huge"], "invalid choice: 'huge'"),
    (export.main, [".", "--layout", "minimax", "--out", "x"], "invalid choice: 'minimax'"),
    (distill.main, ["--method", "mtt"], "invalid choice: 'mtt'"),
    (distill.main, ["--ipc", "ten"], "invalid int value: 'ten'"),
    (distill.main, ["--set", "igd_checkpoints=²"], "--set igd_checkpoints must be 'auto' or indices"),
    (distill.main, ["--method", "igd", "--set", "igd_checkpoints=0,99"], "the surrogate's trajectory has snapshots"),
    (distill.main, ["--set", "lambda=3"], "--set lambda=3: give NAME=VALUE with NAME one of c0, memory_cap"),
    (distill.main, ["--set", "memory_cap=many"], "--set memory_cap=many: memory_cap takes a int"),
    (distill.main, ["--device", "meta"], "unknown --device 'meta'"),
])
def test_every_cli_refuses_bad_flags_before_any_work(tmp_path, monkeypatch, capsys, main, argv, fragment):
    monkeypatch.chdir(tmp_path)
    one_error_line(*cli(main, argv, capsys), fragment)
    assert os.listdir(tmp_path) == []  # nothing written, nothing trained (no out/cache, no out/results)


def test_a_cell_whose_sampler_diverged_is_a_row_not_a_crash(tmp_path, monkeypatch):
    """A sweep setting whose samples go non-finite (distill.py refuses to write them) is recorded in its cell and
    shown as such; the sweep goes on, a rerun does not retry it, and any other failure still stops the table."""
    import subprocess
    monkeypatch.chdir(tmp_path)
    calls = []

    def refused(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "sampling\nerror: refusing to write x.png: the image is "
                                                           "not finite (NaN/inf); check the guidance and CFG scales\n")
    monkeypatch.setattr(results.subprocess, "run", refused)
    cell = ("MGD3 lambda 3, t_stop 10", ["--method", "mgd3", "--mode-scale", "3"], 0)
    assert results.fill(cell, 1) == "MGD3 lambda 3, t_stop 10 seed 0" and len(calls) == 1
    assert results.fill(cell, 1) and len(calls) == 1  # recorded: not run again
    assert results.summary(cell[0], cell[1], (0,))[1] == "diverged: non-finite samples"
    monkeypatch.setattr(results.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(
        command, 1, "", "error: out of disk\n"))
    with pytest.raises(UserError, match="out of disk"):
        results.fill(("DiT", ["--method", "dit"], 0), 1)


@pytest.mark.parametrize("flags,fragment", [
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number >= 1"),
    (["--cfg-scale", "0.5"], "--cfg-scale"),
    (["--deviation-scale", "nan"], "--deviation-scale must be a finite number"),
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    (["--guidance-scale", "-1"], "--guidance-scale"),
    (["--omega", "inf"], "--omega must be a finite number"),
    (["--set", "c0=0"], "--set c0 must be a finite number > 0"),
    (["--res", "0"], "--res must be at least 8"),
    (["--set", "memory_cap=0"], "--set memory_cap must be at least 1"),
    (["--set", "memory_cap=-3"], "--set memory_cap must be at least 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--student-epochs", "0"], "--student-epochs must be at least 1"),
    (["--student-epochs", "-5"], "--student-epochs must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
    (["--steps", "100000"], "--steps 100000 is outside 1..1000"),
    (["--guide-from", "-1"], "--guide-from must be >= 0"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--precision", "bf16", "--device", "cpu"], "--precision bf16 is CUDA autocast"),
    (["--set", "igd_scale=nan"], "--set igd_scale must be a finite number"),
    (["--set", "grad_ipc=0"], "--set grad_ipc must be at least 1"),
    (["--set", "igd_checkpoints=0,five"], "--set igd_checkpoints must be 'auto' or indices"),
    (["--seed-set", "nowhere"], "--seed-set nowhere is not a folder"),
    # a guided run whose window holds no sampling step would be unguided under its name
    (["--steps", "1"], "--guide-from 10 .. --guide-until 45 holds none of the 1 sampling steps"),
    (["--steps", "40", "--guide-from", "45", "--guide-until", "49"], "holds none of the 40 sampling steps"),
    (["--method", "igd", "--steps", "20"], "--set igd_from 30 .. igd_until 45 holds none of the 20"),
    (["--seed-set", "igd", "--steps", "25"], "--set igd_from 30"),
])
def test_out_of_range_flags_are_refused_before_any_write(tmp_path, monkeypatch, capsys, flags, fragment):
    monkeypatch.chdir(tmp_path)
    code, lines = cli(distill.main, flags + ["--out-dir", tmp_path / "run"], capsys)
    one_error_line(code, lines, fragment)
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()  # nothing written, nothing trained


def test_steps_beyond_a_loaded_priors_schedule_is_one_line(tmp_path, latent_prior, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_error_line(*cli(distill.main, ["--dataset", "digits", "--method", "dit", "--prior", latent_prior, "--steps",
                                       100000, "--out-dir", tmp_path / "r"], capsys),
                   "--steps 100000 is outside 1..1000")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    one_error_line(*cli(distill.main, ["--device", "cuda", "--out-dir", tmp_path / "run"], capsys),
                   "CUDA is not available")


def test_ctrl_c_is_one_line_exit_130_and_the_rerun_resumes(tmp_path, pixel_prior, capsys, monkeypatch):
    """Ctrl-C (SIGINT) at a moment fixed in advance: as stage 1's student starts training."""
    args = ["--dataset", "digits", "--prior", pixel_prior, "--ipc", 3, "--stage-ipc", 1, "--steps", 6,
            "--guide-from", 0, "--guide-until", 5, "--student-epochs", 3, "--reference-epochs", 1, "--no-eval",
            "--out-dir", tmp_path / "r"]
    r = run_signalled("curriculum:stage_student", "a[1] == 1", "SIGINT", *args, cwd=tmp_path)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert (tmp_path / "r" / "stage_0" / "done.json").exists() and not (tmp_path / "r" / "stage_1").exists()
    assert not (tmp_path / "r" / ".lgd-lock").exists()
    monkeypatch.chdir(tmp_path)
    assert cli(distill.main, args, capsys)[0] == 0  # the same command resumes and finishes
    assert len(tree(tmp_path / "r" / "distilled")) == 30


@pytest.mark.parametrize("args,message", [
    (["--dataset", "cifar"], "invalid choice: 'cifar'"),
    (["--dataset", "imagewoof", "--data-dir", "/does/not/exist"], "does not exist"),
    (["--dataset", "imagenet"], "needs --data-dir"),
    (["--ipc", "0"], "--ipc must be positive"),
    (["--ipc", "-3", "--method", "dit"], "--ipc must be positive"),
    (["--ipc", "10", "--stage-ipc", "3"], "not a multiple"),
    (["--stage-ipc", "0"], "--stage-ipc must be positive"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    out = tmp_path / "never"
    r = in_process("distill.py", *args, "--out-dir", out, cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not (tmp_path / "out").exists()  # nothing written


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    r = in_process("distill.py", "--dry-run", "--out-dir", tmp_path / "plan", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "stage 4" in r.stdout and "100 images" in r.stdout
    assert not (tmp_path / "plan").exists() and not (tmp_path / "out").exists()


def test_dry_run_json_is_the_resolved_configuration(tmp_path):
    r = in_process("distill.py", "--dataset", "imagewoof", "--dry-run", "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)
    assert config["student_view"] == dict(res=224, test="Resize(224) + CenterCrop(224)", mean=[0.485, 0.456, 0.406],
                                          std=[0.229, 0.224, 0.225])
    assert config["reference_view"]["res"] == 256 and config["reference_view"]["mean"] == [0.5] * 3
    assert config["guidance"]["form"] == "z" and config["guidance"]["scale"] == 15.0 and config["batch_size"] == 24
    assert config["guided_steps"] == 36 and config["student_norm"] == "instance norm"
    assert config["seed_set"] == "igd"  # the paper's pipeline: T_1 from IGD
    assert config["recipe_settings"]["lr"] == 0.01
    assert "RandomResizedCrop(224, 0.5-1)" in config["student_train_transform"]
    assert not (tmp_path / "out").exists()


def test_a_users_reference_model_replaces_the_trained_one(pixel_prior, tmp_path):
    from reference import reference_view as view_of
    theta = make_student("convnet", view_of(get_spec("digits")), seed=3)
    torch.save(theta.state_dict(), tmp_path / "theta.pt")
    base = ["--dataset", "digits", "--prior", pixel_prior, "--ipc", 2, "--stage-ipc", 1, "--steps", 4,
            "--guide-from", 0, "--guide-until", 3]
    r = in_process("distill.py", *base, "--student-epochs", 1, "--no-eval", "--reference", tmp_path / "theta.pt",
                   "--out-dir", tmp_path / "r", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "out" / "cache").exists()  # nothing trained on the real data
    assert json.loads((tmp_path / "r" / "args.json").read_text())["reference"] == str(tmp_path / "theta.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pt")
    r = in_process("distill.py", *base, "--reference", tmp_path / "bad.pt", "--out-dir", tmp_path / "r2", cwd=tmp_path)
    assert r.returncode == 1 and "does not fit --arch convnet" in r.stderr.strip().splitlines()[-1]


def test_dry_run_and_every_run_folder_list_the_classes(tmp_path, latent_prior, fake_woof, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = [dict(index=c, wnid=w, prior_label=i, name=n)
             for c, (w, i, n) in enumerate(zip(FIELD_WOOF, FIELD_WOOF_IDS, FIELD_WOOF_NAMES))]
    r = in_process("distill.py", "--dataset", "imagewoof", "--dry-run", "json", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["classes"] == table
    run = tmp_path / "run"
    argv = ["--dataset", "imagewoof", "--method", "dit", "--no-preflight", "--ipc", 1, "--steps", 2, "--data-dir",
            fake_woof, "--prior", latent_prior, "--res", 16, "--out-dir", run]
    assert cli(distill.main, argv, capsys)[0] == 0
    assert json.loads((run / "classes.json").read_text()) == table
    # a run folder whose classes are numbered otherwise (say, sorted) is refused by evaluate.py and by a resume
    (run / "classes.json").write_text(json.dumps([dict(r, index=c) for c, r in enumerate(
        sorted(table, key=lambda r: r["wnid"]))]))
    for main, flags in ((evaluate.main, ["--distilled", run, "--runs", 1]), (distill.main, argv)):
        one_error_line(*cli(main, flags, capsys), "numbers its classes differently", "class 0 is ('n02086240', 155)")
    os.remove(run / "classes.json")  # a folder from before classes.json: its stages number ImageWoof sorted
    one_error_line(*cli(distill.main, argv, capsys), "before lgd numbered this dataset in the field's class order")


def test_bench_tiny_reports_parts_flops_and_ratios(tmp_path):
    import bench
    result = bench.main(["--size", "tiny", "--batch-size", "4", "--repeats", "1", "--json", str(tmp_path / "b.json")])
    run = result["runs"][0]
    assert [r["variant"] for r in run["rows"]] == ["unguided", "guided", "igd"]
    rows = run["rows"]
    assert all(r["ratio"] == pytest.approx(r["step_s"] / rows[0]["step_s"]) for r in rows)  # against unguided
    assert rows[2]["gflops"] > rows[1]["gflops"] > rows[0]["gflops"]  # a double backward > a backward > none
    parts = {c["part"]: c for c in run["components"]}
    # the guided step's FLOPs are at least the DiT forward + its input-backward + the classifiers'
    assert run["rows"][1]["gflops"] * 1e9 >= 0.99 * (parts["DiT CFG forward, with grad"]["flops"] +
                                                    parts["DiT input-backward"]["flops"])
    assert run["guided_over_parts"] == pytest.approx(rows[1]["step_s"] / run["exact_parts_sum_s"])
    assert json.loads((tmp_path / "b.json").read_text())["runs"][0]["batch"] == 4


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
    """The README's CPU quick start as a new user runs it in a fresh clone: every line of its first ```bash block, in
    order, in an empty folder, through each CLI's own main. Two stand-ins make it seconds instead of minutes: the
    digits prior is the exact denoiser of 20 real digits per class (its samples are real digits; no training), and
    every student trains 3 epochs. The flags, the folders and their order are the README's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_prior, "embedded_prior", lambda *a, **k: "the embedded prior (a stand-in here)")
    monkeypatch.setattr(train_prior, "load_prior", lambda *a, **k: make_empirical_prior())
    short = lambda ipc, recipe="minimax", dataset=None, **k: 3
    for module in (curriculum, evaluate, preflight, ts):
        monkeypatch.setattr(module, "epochs_for_ipc", short)
    monkeypatch.setitem(reference.EMBEDDED_SURROGATE_EPOCHS, "digits", 3)  # theta*, IGD surrogate: 3 epochs
    for command in quick_start_commands():
        out = []
        code, lines = cli(MAINS[command[1]], command[2:], capsys, out)
        assert code == 0, (command, lines[-3:])
    assert os.path.exists(tmp_path / "out" / "digits_lgd_ipc10_seed0" / "eval.json")
    assert os.path.exists(tmp_path / "out" / "digits_lgd_ipc10_seed0" / "preflight.json")


def test_the_forking_guides_worked_example_is_the_score_file_itself():
    """docs/forking.md shows scores/entropy.py in full: the example a forker copies is the file the tests run."""
    text = open(os.path.join(REPO, "docs", "forking.md")).read()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert block == open(os.path.join(REPO, "scores", "entropy.py")).read()
