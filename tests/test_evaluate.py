"""evaluate.py reads a run's set as the run planned it: complete or refused with the command that finishes it, nothing
that is not the run's, and a run folder of another dataset named instead of a download."""
import json
import os
import shutil

import pytest
import torch

import distill
import evaluate
from common import save_png
from conftest import cli, file_hashes, one_error_line, tree


def dit_argv(prior, out, ipc=4):
    return ["--dataset", "digits", "--method", "dit", "--prior", prior, "--ipc", ipc, "--steps", 3, "--no-eval",
            "--out-dir", out]


@pytest.fixture(scope="module")
def dit_run(pixel_prior, tmp_path_factory):
    """A finished --method dit digits run (40 images), on the stand-in prior."""
    out = tmp_path_factory.mktemp("dit") / "run"
    assert distill.main([str(a) for a in dit_argv(pixel_prior, out)]) is None
    return out


@pytest.mark.parametrize("flags", [["--distilled"], ["--redundancy"], ["--export", "OUT"]])
def test_an_unfinished_set_is_refused_with_the_command_that_finishes_it(dit_run, pixel_prior, tmp_path, capsys, flags):
    run = shutil.copytree(dit_run, tmp_path / "run")
    for c in (3, 7):  # killed at 38 of 40 images: every class folder is there
        os.remove(run / "distilled" / str(c) / "00003.png")
    argv = [flags[0], run] + (["--layout", "rded", "--out", tmp_path / "export"] if flags[0] == "--export" else []) + \
        (["--runs", 1, "--epochs", 1] if flags[0] == "--distilled" else [])
    one_error_line(*cli(evaluate.main, argv, capsys), "holds 38 of the 40 images of its set",
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
    assert cli(evaluate.main, ["--export", run, "--layout", "rded", "--out", tmp_path / "x"], capsys, out)[0] == 0
    assert "exported 40 images" in out[0] and len(tree(tmp_path / "x")) == 41  # 40 PNGs + export.json
    assert "1 files in" in out[0] and "4/00099.png (not in the plan)" in out[0]
    save_png(torch.rand(1, 9, 9), str(run / "distilled" / "2" / "00001.png"))  # one of the set, resized
    one_error_line(*cli(evaluate.main, ["--distilled", run, "--runs", 1], capsys), "2/00001.png is 9x9 grey, not 8x8 "
                   "grey like the rest of the run's set", "delete them and rerun the run's command")


def test_a_run_folder_of_another_dataset_is_named_not_downloaded(dit_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    one_error_line(*cli(evaluate.main, ["--distilled", dit_run, "--dataset", "imagewoof"], capsys),
                   "is a digits run (its args.json), not imagewoof")
    assert os.listdir(tmp_path) == []  # no out/data: nothing was downloaded


def test_size_is_refused_with_rded_which_resizes_by_itself(dit_run, tmp_path, capsys):
    one_error_line(*cli(evaluate.main, ["--export", dit_run, "--layout", "rded", "--size", 64, "--out", tmp_path / "x"],
                        capsys), "--size applies to --layout ddranking only")
    assert not (tmp_path / "x").exists()
