"""Nothing lost, nothing silently wrong: bad flags, broken trees and caches, full disks, kills, Ctrl-C and
concurrent runs each end in one `error:` line (or a rerun that completes), never a traceback or a silent
wrong result."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import distill
import evaluate
from conftest import REPO, cli, make_fake_imagewoof, one_error_line, run_cli, tree

DIT = ["--method", "dit", "--steps", 3, "--batch-size", 8, "--no-preflight"]  # stand-in priors fail a preflight


# ----------------------------------------------------------------------------- flags: finite and in range

@pytest.mark.parametrize("flags,fragment", [
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number >= 1"),
    (["--cfg-scale", "0.5"], "--cfg-scale"),
    (["--deviation-scale", "nan"], "--deviation-scale must be a finite number"),
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    (["--guidance-scale", "-1"], "--guidance-scale"),
    (["--lambda-ref", "inf"], "--omega must be a finite number"),  # --lambda-ref: the same flag, old name
    (["--c0", "0"], "--c0 must be a finite number > 0"),
    (["--res", "0"], "--res must be at least 8"),
    (["--memory-cap", "0"], "--memory-cap must be at least 1"),
    (["--memory-cap", "-3"], "--memory-cap must be at least 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--student-epochs", "0"], "--student-epochs must be at least 1"),
    (["--student-epochs", "-5"], "--student-epochs must be at least 1"),
    (["--eval-epochs", "0"], "--eval-epochs must be at least 1"),
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
    (["--steps", "100000"], "--steps 100000 is outside 1..1000"),
    (["--guide-from", "-1"], "--guide-from must be >= 0"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--precision", "bf16", "--device", "cpu"], "--precision bf16 is CUDA autocast"),
    (["--igd-scale", "nan"], "--igd-scale must be a finite number"),
    (["--grad-ipc", "0"], "--grad-ipc must be at least 1"),
    (["--igd-checkpoints", "0,five"], "--igd-checkpoints must be 'auto' or indices"),
    (["--seed-set", "nowhere"], "--seed-set nowhere is not a folder"),
    # a guided run whose window holds no sampling step would be unguided under its name
    (["--steps", "1"], "--guide-from 10 .. --guide-until 45 holds none of the 1 sampling steps"),
    (["--steps", "40", "--guide-from", "45", "--guide-until", "49"], "holds none of the 40 sampling steps"),
    (["--method", "igd", "--steps", "20"], "--igd-from 30 .. --igd-until 45 holds none of the 20"),
    (["--seed-set", "igd", "--steps", "25"], "--igd-from 30"),
])
def test_out_of_range_flags_are_refused_before_any_write(tmp_path, monkeypatch, capsys, flags, fragment):
    monkeypatch.chdir(tmp_path)
    code, lines = cli(distill.main, flags + ["--out-dir", tmp_path / "run"], capsys)
    one_error_line(code, lines, fragment)
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()  # nothing written, nothing trained


def test_steps_beyond_a_loaded_priors_schedule_is_one_line(tmp_path, latent_prior, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_error_line(*cli(distill.main, ["--dataset", "digits", "--method", "dit", "--prior", latent_prior, "--steps",
                                       100000, "--out-dir", tmp_path / "r"], capsys), "--steps 100000 is outside 1..1000")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    one_error_line(*cli(distill.main, ["--device", "cuda", "--out-dir", tmp_path / "run"], capsys), "CUDA is not available")


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


def test_save_png_refuses_a_non_finite_image_and_json_is_strict(tmp_path):
    with pytest.raises(common.UserError, match="not finite"):
        common.save_png(torch.full((1, 4, 4), float("nan")), str(tmp_path / "x.png"))
    with pytest.raises(ValueError):  # allow_nan=False: a NaN is an error, never a bare `NaN` token
        common.save_json({"x": float("nan")}, str(tmp_path / "x.json"))
    assert os.listdir(tmp_path) == []  # and no temporary is left behind


# ----------------------------------------------------------------------------- the run folder

def test_user_temporaries_survive_and_only_our_stale_temporaries_go(tmp_path, latent_prior, fake_woof, capsys,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    argv = ["--dataset", "imagewoof", *DIT, "--ipc", 1, "--data-dir", fake_woof, "--prior", latent_prior, "--res", 16,
            "--out-dir", run]
    assert cli(distill.main, argv, capsys)[0] == 0
    users = [run / "notes.tmp1", run / "photos" / "2024" / "edit.tmp2024", run / "distilled" / "mine.tmp7"]
    ours = [run / ".args.json.lgd-tmp-99999", run / "distilled" / "n02086240" / ".00000.png.lgd-tmp-123"]
    for path in users + ours:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert cli(distill.main, argv, capsys)[0] == 0  # a rerun (resume: nothing to do) tidies the folder
    assert all(p.exists() for p in users) and not any(p.exists() for p in ours)


def test_a_non_empty_folder_that_is_not_a_run_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.tmp2024").write_text("precious")
    one_error_line(*cli(distill.main, ["--out-dir", tmp_path / "photos"], capsys), "not an lgd run folder")
    assert tree(tmp_path / "photos") == ["holiday.tmp2024"]
    (tmp_path / "file").write_text("x")
    one_error_line(*cli(distill.main, ["--out-dir", tmp_path / "file"], capsys), "is a file")


def test_two_runs_at_once_into_one_folder_exactly_one_proceeds(tmp_path, latent_prior, fake_woof):
    """Different settings, started together: one claims the folder (O_EXCL lock) and finishes, the other stops
    with one line naming the folder; the folder holds only the winner's images and settings."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    base = [sys.executable, os.path.join(REPO, "distill.py"), "--dataset", "imagewoof", "--method", "dit", "--ipc", "2",
            "--no-preflight",
            "--steps", "30", "--data-dir", fake_woof, "--prior", latent_prior, "--res", "16", "--out-dir",
            str(tmp_path / "run")]
    procs = [subprocess.Popen(base + ["--seed", str(seed)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "Traceback" not in loser and str(tmp_path / "run") in loser.strip().splitlines()[-1]
    winner_seed = (1, 2)[[code for code, _ in results].index(0)]
    assert json.loads((tmp_path / "run" / "args.json").read_text())["seed"] == winner_seed
    assert not (tmp_path / "run" / ".lgd-lock").exists()  # released at the end


def test_a_killed_runs_lock_is_taken_over(tmp_path):
    from run_folder import LOCK, claim_run_folder
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "args.json").write_text("{}")
    (tmp_path / "run" / LOCK).write_text(json.dumps(dict(pid=dead.pid, host=os.uname().nodename)))
    release = claim_run_folder(str(tmp_path / "run"))  # the dead pid's lock is stale: taken over
    assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == os.getpid()
    with pytest.raises(common.UserError, match="in use by another run"):
        claim_run_folder(str(tmp_path / "run"))  # a live owner (this process) is respected
    release()
    assert not (tmp_path / "run" / LOCK).exists()


def test_resume_with_another_data_dir_is_refused(tmp_path, latent_prior, fake_woof, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", "imagewoof", *DIT, "--ipc", 1, "--prior", latent_prior, "--res", 16, "--out-dir", tmp_path / "r"]
    assert cli(distill.main, argv + ["--data-dir", fake_woof], capsys)[0] == 0
    other = shutil.copytree(fake_woof, tmp_path / "woof_copy")
    one_error_line(*cli(distill.main, argv + ["--data-dir", other], capsys), "different --data-dir")
    one_error_line(*cli(distill.main, argv + ["--data-dir", fake_woof, "--batch-size", 4], capsys),
                   "different --batch-size")


def test_corrupt_args_json_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "args.json").write_text("{ not json")
    one_error_line(*cli(distill.main, ["--method", "dit", "--out-dir", tmp_path / "run"], capsys), "not valid JSON",
                   "args.json")


# ----------------------------------------------------------------------------- data trees and sets

@pytest.mark.parametrize("split", ["train", "val"])
def test_an_empty_class_folder_is_refused_by_name(tmp_path, latent_prior, capsys, split):
    woof = make_fake_imagewoof(str(tmp_path / "woof"))
    wnid = sorted(os.listdir(f"{woof}/{split}"))[3]
    for f in os.listdir(f"{woof}/{split}/{wnid}"):
        os.remove(f"{woof}/{split}/{wnid}/{f}")
    code, lines = cli(distill.main, ["--dataset", "imagewoof", *DIT, "--data-dir", woof, "--prior", latent_prior,
                                     "--out-dir", tmp_path / "run"], capsys)
    one_error_line(code, lines, wnid, f"{split}/{wnid}")
    assert not (tmp_path / "run").exists()


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


# ----------------------------------------------------------------------------- caches and damaged run folders

def test_broken_prior_config_is_one_line(tmp_path, latent_prior, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    broken = shutil.copytree(latent_prior, tmp_path / "prior")
    config = json.loads((broken / "transformer" / "config.json").read_text())
    (broken / "transformer" / "config.json").write_text(json.dumps(dict(config, num_layers="four")))
    one_error_line(*cli(distill.main, ["--dataset", "digits", *DIT, "--prior", broken, "--out-dir", tmp_path / "r"],
                        capsys), "could not load prior")


def test_a_broken_digits_prior_cache_says_how_to_remove_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "cache" / "digits_prior" / "transformer").mkdir(parents=True)  # weights never written
    code, lines = cli(distill.main, [*DIT, "--ipc", 1, "--out-dir", tmp_path / "r"], capsys)
    one_error_line(code, lines, "cached digits prior is broken", "rm -r out/cache/digits_prior")


def test_a_done_stage_with_a_deleted_image_is_one_line(tmp_path, pixel_prior, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", "digits", "--prior", pixel_prior, "--ipc", 2, "--stage-ipc", 1, "--steps", 4, "--student-epochs",
            1, "--reference-epochs", 1, "--no-eval", "--guide-from", 0, "--guide-until", 3, "--out-dir", tmp_path / "r"]
    assert cli(distill.main, argv, capsys)[0] == 0
    os.remove(tmp_path / "r" / "stage_0" / "images" / "7" / "00000.png")
    one_error_line(*cli(distill.main, argv, capsys), "stage 0 is marked done", "7/00000.png", "delete")


# ----------------------------------------------------------------------------- disks, kills and Ctrl-C

def test_full_disk_while_saving_a_student_says_disk_full(tmp_path, pixel_prior, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "student.pt" in str(path):
            open(path, "wb").write(b"partial")  # the bytes that fit, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return save(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_disk)
    argv = ["--dataset", "digits", "--prior", pixel_prior, "--ipc", 2, "--stage-ipc", 1, "--steps", 4, "--guide-from", 0,
            "--guide-until", 3, "--student-epochs", 1, "--reference-epochs", 1, "--no-eval", "--out-dir", tmp_path / "r"]
    code, lines = cli(distill.main, argv, capsys)
    one_error_line(code, lines, "disk full", "student.pt")
    assert not [f for f in tree(tmp_path / "r") if "lgd-tmp" in f]  # the half-written temporary is gone
    monkeypatch.setattr(torch, "save", save)
    assert cli(distill.main, argv, capsys)[0] == 0  # with room again, the rerun completes


def test_unwritable_out_dir_fails_before_the_prior_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_open = os.open

    def read_only(path, flags, *args):
        if str(tmp_path / "ro") in str(path) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", read_only)
    (tmp_path / "ro").mkdir()
    code, lines = cli(distill.main, ["--method", "dit", "--out-dir", tmp_path / "ro"], capsys)
    one_error_line(code, lines, "Permission denied", str(tmp_path / "ro"))
    assert not (tmp_path / "out").exists()  # the digits prior was not even trained


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


def test_ctrl_c_is_one_line_exit_130_and_the_rerun_resumes(tmp_path, pixel_prior):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    args = ["--dataset", "digits", "--prior", pixel_prior, "--ipc", 3, "--stage-ipc", 1, "--steps", 6, "--guide-from", 0,
            "--guide-until", 5, "--student-epochs", 30, "--reference-epochs", 1, "--no-eval", "--out-dir", tmp_path / "r"]
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "distill.py"), *map(str, args)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "r" / "stage_0" / "done.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert not (tmp_path / "r" / ".lgd-lock").exists()
    r = run_cli("distill.py", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(tree(tmp_path / "r" / "distilled")) == 30
