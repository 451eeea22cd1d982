"""Evaluation (evaluate.py): accuracy over seeded students, redundancy (the paper's Fig. 2), the comparison table, and a
run's set read as the run planned it: complete or refused with the command that finishes it, nothing that is not
the run's."""
import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch

import distill
import evaluate
from conftest import (
    cli,
    digits_set,
    file_hashes,
    in_process,
    one_error_line,
    tree,
)
from data import (
    ImageSet,
    get_spec,
)
from evaluate import compare, increments_of, redundancy_matrix, redundancy_report
from ground import common
from ground.common import UserError, save_png
from ground.locks import LOCK, Lock
from model import make_student
from tools import export
from train_student import (
    train_student,
)

SPEC = get_spec("digits")

def test_evaluate_cli_writes_eval_json(tmp_path, fake_woof):
    """--real-ipc baseline on the fake tree: eval.json with its documented keys, accuracies as fractions."""
    r = in_process("evaluate.py", "--dataset", "imagewoof", "--data-dir", fake_woof, "--real-ipc", 2, "--runs", 2,
                "--epochs", 3, "--res", 16, "--out", tmp_path / "real", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "real" / "eval.json").read_text())
    for key in ("dataset", "method", "ipc", "arch", "runs", "accs", "acc_mean", "acc_std"):
        assert key in result
    assert result["ipc"] == 2 and result["runs"] == 2 and len(result["accs"]) == 2
    assert all(0 <= a <= 1 for a in result["accs"])
    assert abs(result["acc_mean"] - np.mean(result["accs"])) < 1e-9


def test_the_best_column_is_taken_over_100_checkpoints():
    spec = get_spec("digits")
    from data import load_real, sample_real_ipc
    data = sample_real_ipc(load_real(spec, None, "train"), 1, 0)
    calls = []
    train_student(make_student("convnet", spec, seed=0), data, spec, "minimax", 200, on_eval=lambda m: calls.append(1))
    assert len(calls) == 100  # every 2 epochs, the last included (Minimax evaluates epochs / 100 apart)


def test_redundancy_matrix_on_a_constructed_case():
    """Increment a's 'model' recognises increments a and a+1 only: R = I + superdiagonal."""
    spec = get_spec("digits")
    increments = [ImageSet([torch.full((1, 8, 8), k / 10.0)] * 10, list(range(10))) for k in range(4)]

    class Memoriser(torch.nn.Module):
        def __init__(self, known):
            super().__init__()
            self.known = known

        def forward(self, x):  # right label on images of the known increments, a fixed wrong one elsewhere
            pixel = x[:, 0, 0, 0] * spec.std[0] + spec.mean[0]  # undo the normalisation of the test transform
            k = torch.round(pixel * 10).long()
            right = torch.tensor([int(kk) in self.known for kk in k])
            labels = torch.arange(len(x)) % 10  # accuracy() batches the 10 images of an increment in order
            return torch.nn.functional.one_hot(torch.where(right, labels, (labels + 1) % 10), 10).float()

    matrix, off = redundancy_matrix(increments, spec, train=lambda inc, a: Memoriser({a, a + 1}))
    expected = np.eye(4) + np.eye(4, k=1)
    assert np.array_equal(np.array(matrix), expected)
    assert off == pytest.approx(3 / 12)  # 3 ones among the 12 off-diagonal cells


def test_increments_follow_generation_order(tmp_path):
    from ground.common import save_png
    for c in range(10):
        for i in range(4):
            save_png(torch.full((1, 8, 8), i / 10), str(tmp_path / str(c) / f"{i:05d}.png"))
    incs = increments_of(str(tmp_path), SPEC, 2)
    assert len(incs) == 2 and len(incs[1]) == 20
    assert all(p.endswith(("00002.png", "00003.png")) for p in incs[1].items)
    with pytest.raises(UserError):
        increments_of(str(tmp_path), SPEC, 3)


def test_redundancy_report_and_compare(tmp_path):
    """A real (tiny) run of the report: JSON keys, heatmap PNG, then the comparison table."""
    from data import load_digits_split, sample_real_ipc
    real = sample_real_ipc(load_digits_split("train"), 2, seed=0)
    increments = [real.subset([c * 2 + k for c in range(10)]) for k in range(2)]
    result = redundancy_report(increments, SPEC, str(tmp_path / "a"), "real", epochs=2)
    saved = json.loads((tmp_path / "a" / "redundancy.json").read_text())
    assert np.array(saved["matrix"]).shape == (2, 2)
    assert saved["off_diagonal_mean"] == pytest.approx((saved["matrix"][0][1] + saved["matrix"][1][0]) / 2)
    assert saved == json.loads(json.dumps(dict(result, git_commit=saved["git_commit"])))
    from PIL import Image
    with Image.open(tmp_path / "a" / "redundancy.png") as im:
        assert im.size[0] > 100
    for name, acc in (("a", 0.9), ("b", 0.8)):
        ev = dict(dataset="digits", method=name, ipc=2, arch="convnet", runs=3, accs=[acc] * 3, acc_mean=acc,
                  acc_std=0.0, best_mean=acc, best_std=0.0)
        os.makedirs(tmp_path / name, exist_ok=True)
        (tmp_path / name / "eval.json").write_text(json.dumps(ev))
    md = compare([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "cmp.md"))
    lines = md.strip().splitlines()[1:]  # under the stamp line
    assert len(lines) == 4 and "90.0 +- 0.0 (n=3)" in lines[2] and "80.0" in lines[3]
    assert f"{100 * saved['off_diagonal_mean']:.1f}" in lines[2] and lines[3].split("|")[7].strip() == "-"


@pytest.mark.parametrize("flags", [["--distilled"], ["--redundancy"], ["export"]])
def test_an_unfinished_set_is_refused_with_the_command_that_finishes_it(dit_run, pixel_prior, tmp_path, capsys, flags):
    run = shutil.copytree(dit_run, tmp_path / "run")
    for c in (3, 7):  # killed at 38 of 40 images: every class folder is there
        os.remove(run / "distilled" / str(c) / "00003.png")
    if flags[0] == "export":
        main, argv = export.main, [run, "--layout", "rded", "--out", tmp_path / "export"]
    else:
        argv = [flags[0], run] + (["--runs", 1, "--epochs", 1] if flags[0] == "--distilled" else [])
        main = evaluate.main
    one_error_line(*cli(main, argv, capsys), "holds 38 of the 40 images of its set",
                   "finish it with: python distill.py --dataset digits --method dit")
    assert not (tmp_path / "export").exists()
    # the command it names finishes the set, the same bytes as the run that was never killed
    command = json.loads((run / "args.json").read_text())["command"].split()[2:]
    assert cli(distill.main, [a.replace(str(dit_run), str(run)) for a in command], capsys)[0] == 0
    assert file_hashes(run / "distilled") == file_hashes(dit_run / "distilled")


def test_files_that_are_not_the_runs_are_named_and_left_out(dit_run, tmp_path, capsys):
    run = shutil.copytree(dit_run, tmp_path / "run")
    save_png(torch.rand(1, 8, 8), str(run / "distilled" / "4" / "00099.png"))  # an extra image
    (run / "distilled" / "4" / "notes.txt").write_text("mine")
    out = []
    assert cli(export.main, [run, "--layout", "rded", "--out", tmp_path / "x"], capsys, out)[0] == 0
    assert "exported 40 images" in out[0] and len(tree(tmp_path / "x")) == 41  # 40 PNGs + export.json
    assert "1 files in" in out[0] and "4/00099.png (not in the plan)" in out[0]
    save_png(torch.rand(1, 9, 9), str(run / "distilled" / "2" / "00001.png"))  # one of the set, resized
    one_error_line(*cli(evaluate.main, ["--distilled", run, "--runs", 1], capsys), "2/00001.png",
                   "not what the run made", "delete them and rerun the run's command")


def test_a_run_folder_of_another_dataset_is_named_not_downloaded(dit_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    one_error_line(*cli(evaluate.main, ["--distilled", dit_run, "--dataset", "imagewoof"], capsys),
                   "is a digits run (its args.json), not imagewoof")
    assert os.listdir(tmp_path) == []  # no out/data: nothing was downloaded


@pytest.mark.parametrize("flags,fragment", [
    (["--redundancy", "RUN", "--stage-ipc", "-2"], "--stage-ipc must be positive"),
    (["--distilled", "RUN", "--epochs", "0"], "--epochs must be at least 1"),
    (["--real-ipc", "0"], "--real-ipc must be positive"),
    (["--compare", "RUN", "--markdown", "DIR"], "is a folder"),
])
def test_evaluate_flags_are_checked(tmp_path, capsys, flags, fragment):
    (tmp_path / "run").mkdir()
    flags = [str(tmp_path / "run") if f == "RUN" else str(tmp_path) if f == "DIR" else f for f in flags]
    one_error_line(*cli(evaluate.main, flags, capsys), fragment)


def test_evaluate_refuses_a_distilled_set_with_an_empty_class(tmp_path, capsys):
    for c in range(10):
        os.makedirs(tmp_path / "set" / str(c))
        if c != 4:
            common.save_png(torch.rand(1, 8, 8), str(tmp_path / "set" / str(c) / "00000.png"))
    one_error_line(*cli(evaluate.main, ["--distilled", tmp_path / "set", "--runs", 1, "--epochs", 1], capsys),
                   "class '4' has no images")


def test_a_png_of_another_mode_or_size_in_a_bare_set_is_named_and_left_out(tmp_path, capsys):
    from PIL import Image
    for c in range(10):
        common.save_png(torch.rand(1, 8, 8), str(tmp_path / "set" / str(c) / "00000.png"))
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "set" / "3" / "00001.png")  # recoloured
    common.save_png(torch.rand(1, 9, 9), str(tmp_path / "set" / "5" / "00001.png"))  # resized
    out = []
    code, _ = cli(evaluate.main, ["--distilled", tmp_path / "set", "--runs", 1, "--epochs", 1], capsys, out)
    assert code == 0
    notes = [line for line in out[0].splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "2 files" in notes[0] and "3/00001.png (8x8 colour)" in notes[0] and \
        "5/00001.png (9x9 grey)" in notes[0]
    result = json.loads((tmp_path / "set" / "eval.json").read_text())
    assert result["images_per_class"] == [1] * 10 and result["ipc"] == 1


def test_redundancy_needs_two_increments(tmp_path, capsys):
    for c in range(10):
        common.save_png(torch.rand(1, 8, 8), str(tmp_path / "set" / str(c) / "00000.png"))
    one_error_line(*cli(evaluate.main, ["--redundancy", tmp_path / "set", "--stage-ipc", 1], capsys),
                   "at least 2 increments")
    assert not (tmp_path / "set" / "redundancy.json").exists()


def test_evaluate_prints_its_numbers_even_when_the_write_fails(tmp_path, capsys, monkeypatch):
    for c in range(10):
        for i in range(2):
            common.save_png(torch.rand(1, 8, 8), str(tmp_path / "set" / str(c) / f"{i:05d}.png"))

    def full_disk(obj, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(evaluate, "save_json", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        common.run_cli(lambda: evaluate.main(["--distilled", str(tmp_path / "set"), "--runs", "1", "--epochs", "1"]))
    captured = capsys.readouterr()
    assert exit_info.value.code == 1 and "acc " in captured.out and "final epoch" in captured.out
    one_error_line(1, [line for line in captured.err.splitlines() if line.strip()],
                   f"error: disk full: {tmp_path / 'set' / 'eval.json'}")


def test_evaluate_out_in_an_unusable_place_fails_before_training(tmp_path, capsys):
    for c in range(10):
        common.save_png(torch.rand(1, 8, 8), str(tmp_path / "set" / str(c) / "00000.png"))
    (tmp_path / "afile").write_text("x")
    code, lines = cli(evaluate.main, ["--distilled", tmp_path / "set", "--out", tmp_path / "afile" / "sub"], capsys)
    one_error_line(code, lines, str(tmp_path / "afile"))
    assert "eval" not in capsys.readouterr().out  # no student was trained


@pytest.mark.parametrize("flag", ["--distilled", "--redundancy", "--validity"])
def test_evaluate_refuses_a_folder_a_live_run_holds(tmp_path, capsys, flag):
    run = tmp_path / "run"
    digits_set(run / "distilled")
    (run / "args.json").write_text(json.dumps(dict(dataset="digits", method="dit", stage_ipc=1, arch="convnet")))
    lock = Lock(str(run / LOCK))
    assert lock.acquire()  # a run "in progress" (this process, through another file descriptor)
    try:
        one_error_line(*cli(evaluate.main, [flag, run, "--runs", 1, "--epochs", 1], capsys),
                       f"{run} is being written by a run (pid {os.getpid()}")
    finally:
        lock.release()
    assert not any(f.startswith(("eval", "redundancy", "validity")) for f in os.listdir(run))  # nothing written
    # released (the run finished): the same command reads the set
    assert cli(evaluate.main, ["--distilled", run, "--runs", 1, "--epochs", 1], capsys)[0] == 0


def test_extra_class_folders_are_named_in_one_notice(tmp_path, capsys):
    folder = digits_set(tmp_path / "set")
    digits_set(tmp_path / "set", classes=["10", "cats"])
    out = []
    assert cli(evaluate.main, ["--distilled", folder, "--runs", 1, "--epochs", 1], capsys, out)[0] == 0
    notes = [line for line in out[0].splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].endswith("not read: 10, cats")


def test_evaluate_on_folders_that_are_not_a_set_is_one_line(tmp_path, capsys):
    letters = digits_set(tmp_path / "letters", classes="abcdefghij")
    one_error_line(*cli(evaluate.main, ["--distilled", letters, "--runs", 1], capsys), "has no folder '0'")
    run = tmp_path / "unfinished"
    digits_set(run / "stage_0" / "images")
    (run / "args.json").write_text(json.dumps(dict(dataset="digits", method="lgd", stage_ipc=1)))
    for flag in ("--distilled", "--redundancy", "--validity"):
        one_error_line(*cli(evaluate.main, [flag, run, "--runs", 1], capsys), "has no distilled/ yet")
