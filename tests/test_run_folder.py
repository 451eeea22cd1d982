"""The machinery behind lab/: the run folder and its lock, the shared cache, settings kept across a resume, damaged
files named with their remedy, and every write whole (a full disk named by the file)."""
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import distill
from conftest import (
    LGD,
    REPO,
    cli,
    digits_set,
    one_error_line,
    tree,
)
from ground import common
from ground.locks import LOCK, Lock, cache_entry
from model import load_prior

ENV = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")


# a small guided LGD run on the random pixel prior (the window must hold a step of the 4)


def python(code, *args):
    """A Python process running `code` with the repo importable (stdout/stderr captured)."""
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_first_runs_at_once_train_the_digits_prior_once(tmp_path):
    """Both processes ask for the prior at the same moment: one trains it, the other says it waits (naming the
    trainer's pid), then reuses it; both finish, nothing half-written or locked is left in the cache."""
    go = tmp_path / "go"
    # both import everything first and say so; only once both have spoken does `go` appear, so both reach the
    # prior at the same moment whatever the machine's speed
    code = ("import os, sys, time\n"
            "from train_prior import embedded_prior\n"
            "print('ready', flush=True)\n"
            "while not os.path.exists(sys.argv[2]): time.sleep(0.01)\n"
            "print('path', embedded_prior('digits', sys.argv[1], dict(steps=60, lr=2e-3, ema_decay=0.995)))")
    procs = [python(code, tmp_path / "cache", go) for _ in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    go.write_text("")
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trained = [i for i, (out, _) in enumerate(outs) if "training the digits prior once" in out]
    assert len(trained) == 1, outs  # trained once
    waiter = outs[1 - trained[0]][0]
    assert f"pid {procs[trained[0]].pid}" in waiter and "waiting for the digits prior" in waiter
    assert os.listdir(tmp_path / "cache") == ["digits_prior"]  # no lock, no temporary, no partial training state
    assert load_prior(str(tmp_path / "cache" / "digits_prior")).image_size == 8


@pytest.mark.slow
def test_two_lgd_runs_at_once_train_theta_star_once(tmp_path, pixel_prior):
    """The CLI path: two LGD runs into two folders, started together, share theta*'s cache entry."""
    args = [*LGD, "--prior", pixel_prior, "--reference-epochs", 30]
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "distill.py"), *map(str, args), "--seed", seed,
                               "--out-dir", tmp_path / f"run{seed}"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in ("0", "1")]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum(out.count("training convnet on the real digits") for out, _ in outs) == 1, outs
    [entry] = os.listdir(tmp_path / "out" / "cache")  # one entry, no lock or temporary left
    assert entry.startswith("surrogate_digits_convnet") and entry.endswith(".pt")


def test_a_waiter_that_looks_before_the_holder_has_written_its_pid_still_names_it(tmp_path, monkeypatch):
    """The holder takes the flock, then writes its pid: a waiter that reads the lock file in between looks again
    instead of naming "pid ?" (seen once when two first runs raced for the digits prior)."""
    import fcntl
    import threading

    from ground import locks

    path = tmp_path / "x.lgd-lock"
    fd = os.open(path, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held, nothing written yet

    seen, told, looked = [], threading.Event(), threading.Event()

    class Reader:  # the waiter's reads of the lock file: the first one finds it empty, and says so
        dumps = staticmethod(json.dumps)

        @staticmethod
        def load(f):
            try:
                return json.load(f)
            except ValueError:
                looked.set()
                raise
    monkeypatch.setattr(locks, "json", Reader)

    def holder():
        looked.wait(30)  # the waiter has found the lock taken and the file empty
        os.pwrite(fd, json.dumps(dict(pid=4242, host="h", started="s")).encode(), 0)
        told.wait(30)  # release only once the waiter has said whom it waits for
        os.unlink(path)
        os.close(fd)

    thread = threading.Thread(target=holder)
    thread.start()
    lock = Lock(str(path))
    assert lock.acquire(wait=True, on_wait=lambda owner: (seen.append(owner), told.set()))
    thread.join()
    lock.release()
    assert seen == [dict(pid=4242, host="h", started="s")]


# a builder: takes the lock, says so, builds the entry once the file argv[2] appears, releases
HOLD = ("import os, sys, time\nfrom ground.locks import Lock\nlock = Lock(sys.argv[1])\nlock.acquire()\n"
        "print('held', flush=True)\n"
        "while not os.path.exists(sys.argv[2]): time.sleep(0.01)\n"
        "os.makedirs(sys.argv[3], exist_ok=True)\nlock.release()\n")


def test_a_cache_entry_waits_for_a_live_builder_and_reuses_its_work(tmp_path, capsys, monkeypatch):
    from ground import locks
    entry, build = tmp_path / "digits_prior", tmp_path / "build"
    holder = python(HOLD, tmp_path / f".digits_prior{LOCK}", build, entry)
    assert holder.stdout.readline().strip() == "held"
    # the builder finishes only once this process has said it waits (an event, not a time)
    monkeypatch.setattr(locks, "print0", lambda line: (print(line), build.write_text("")))
    with cache_entry(str(entry), "the digits prior") as missing:
        assert not missing  # built by the other process while we waited
    out = capsys.readouterr().out
    assert f"waiting for the digits prior: {entry} is being built by pid {holder.pid}" in out
    assert holder.wait(timeout=60) == 0 and not (tmp_path / f".digits_prior{LOCK}").exists()


def test_a_killed_builders_lock_is_taken_over_and_its_temporaries_go(tmp_path, capsys):
    entry = tmp_path / "digits_prior"
    holder = python(HOLD, tmp_path / f".digits_prior{LOCK}", tmp_path / "never", entry)
    assert holder.stdout.readline().strip() == "held"
    (tmp_path / f".digits_prior.lgd-tmp-{holder.pid}").mkdir()  # its half-renamed prior
    (tmp_path / "notes.lgd-tmp").write_text("a user's file")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with cache_entry(str(entry), "the digits prior") as missing:  # no waiting for a dead process (said below)
        assert missing
        assert json.loads((tmp_path / f".digits_prior{LOCK}").read_text())["pid"] == os.getpid()
    assert "waiting" not in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["notes.lgd-tmp"]  # the dead builder's temporary went, nothing else


def broken_seed_set(root, case):
    """A seed set that must be refused, and what the refusal names: a class folder missing, a file PIL cannot
    read, a class folder with no image."""
    folder = digits_set(root / case, ipc=1, classes=range(9) if case == "missing" else range(10))
    if case == "unreadable":
        (folder / "4" / "00000.png").write_bytes(b"\x89PNG truncated")
    if case == "empty":
        os.remove(folder / "6" / "00000.png")
    return folder, {"missing": "has no folder '9'", "unreadable": "cannot read image",
                    "empty": "class '6' has no"}[case]


@pytest.mark.parametrize("case", ["missing", "unreadable", "empty"])
def test_a_bad_seed_set_is_refused_before_the_folder_is_claimed(tmp_path, pixel_prior, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    folder, fragment = broken_seed_set(tmp_path, case)
    out = tmp_path / "run"
    argv = [*LGD, "--prior", pixel_prior, "--out-dir", out]
    one_error_line(*cli(distill.main, argv + ["--seed-set", folder], capsys), fragment)
    assert not out.exists() and not (tmp_path / "out").exists()  # no folder, no args.json, no theta*
    good = digits_set(tmp_path / "good", ipc=1)
    assert cli(distill.main, argv + ["--seed-set", good], capsys)[0] == 0  # the corrected command, same folder


def test_a_bad_reference_is_about_the_users_file_and_refused_before_the_claim(tmp_path, pixel_prior, capsys,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a model")
    run = tmp_path / "run"
    code, lines = cli(distill.main, [*LGD, "--prior", pixel_prior, "--reference", tmp_path / "notes.txt",
                                     "--out-dir", run], capsys)
    one_error_line(code, lines, f"--reference {tmp_path / 'notes.txt'} is not a PyTorch weights file")
    assert "remove" not in lines[-1] and "cache" not in lines[-1]  # the user's file is not ours to delete
    assert not run.exists()  # refused before the claim: no folder
    # the plan refuses what the run refuses: --dry-run loads the file too
    one_error_line(*cli(distill.main, [*LGD, "--prior", pixel_prior, "--reference", tmp_path / "notes.txt", "--dry-run",
                                       "--out-dir", run], capsys), "is not a PyTorch weights file")


DIT = ["--method", "dit", "--steps", 3, "--batch-size", 8, "--no-preflight"]  # stand-in priors fail a preflight


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
    from ground.folder import claim_run_folder
    from ground.locks import LOCK
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
    argv = ["--dataset", "imagewoof", *DIT, "--ipc", 1, "--prior", latent_prior, "--res", 16, "--out-dir",
            tmp_path / "r"]
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


def test_full_disk_while_saving_a_student_says_disk_full(tmp_path, pixel_prior, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "student.pt" in str(path):
            open(path, "wb").write(b"partial")  # the bytes that fit, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return save(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_disk)
    argv = [*LGD, "--prior", pixel_prior, "--out-dir", tmp_path / "r"]
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


def test_broken_prior_config_is_one_line(tmp_path, latent_prior, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    broken = shutil.copytree(latent_prior, tmp_path / "prior")
    config = json.loads((broken / "transformer" / "config.json").read_text())
    (broken / "transformer" / "config.json").write_text(json.dumps(dict(config, num_layers="four")))
    one_error_line(*cli(distill.main, ["--dataset", "digits", *DIT, "--prior", broken, "--out-dir", tmp_path / "r"],
                        capsys), "could not load the DiT of prior")


def test_a_broken_digits_prior_cache_says_how_to_remove_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "cache" / "digits_prior" / "transformer").mkdir(parents=True)  # weights never written
    code, lines = cli(distill.main, [*DIT, "--ipc", 1, "--out-dir", tmp_path / "r"], capsys)
    one_error_line(code, lines, "cached digits prior is broken", "rm -r out/cache/digits_prior")


def test_save_png_refuses_a_non_finite_image_and_json_is_strict(tmp_path):
    with pytest.raises(common.UserError, match="not finite"):
        common.save_png(torch.full((1, 4, 4), float("nan")), str(tmp_path / "x.png"))
    with pytest.raises(ValueError):  # allow_nan=False: a NaN is an error, never a bare `NaN` token
        common.save_json({"x": float("nan")}, str(tmp_path / "x.json"))
    assert os.listdir(tmp_path) == []  # and no temporary is left behind


def test_out_of_memory_becomes_a_batch_size_hint(capsys):
    from ground.common import run_cli as cli

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    with pytest.raises(SystemExit) as exit_info:
        cli(oom)
    assert exit_info.value.code == 1
    assert "--batch-size" in capsys.readouterr().err


@pytest.mark.parametrize("write", [
    lambda path: common.save_torch(torch.randn(100_000), path),                      # torch's zip writer
    lambda path: common.save_png(torch.rand(3, 400, 400), path),                       # PIL
    lambda path: common.save_json({"x": "y" * 400_000}, path),                         # text
    lambda path: common.save_grid(torch.rand(4, 3, 200, 200), path, ["a", "b"], ["0", "1"]),
])
@pytest.mark.parametrize("limit", [300 * 1024, 100])  # the issue's `ulimit -f 300`, and a limit below any header
def test_every_write_that_runs_out_of_room_says_disk_full_and_names_the_file(tmp_path, write, limit):
    path = str(tmp_path / "sub" / "file.png")  # a grid's format follows its name
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(OSError) as info:
            write(path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert info.value.errno == errno.ENOSPC and info.value.filename == path
    assert common.os_error_line(info.value) == f"disk full: {path}"
    assert os.listdir(tmp_path / "sub") == []  # no temporary, no half file


def test_a_verified_write_keeps_equal_bytes_and_names_a_difference(tmp_path):
    path = str(tmp_path / "x.pt")
    common.save_torch(torch.arange(5.0), path)
    before = os.stat(path).st_mtime_ns
    common.save_torch(torch.arange(5.0), path, verify=True)  # the same bytes: nothing rewritten
    assert os.stat(path).st_mtime_ns == before
    with pytest.raises(common.Mismatch, match="x.pt is not what this run computes"):
        common.save_torch(torch.arange(5.0) + 1e-7, path, verify=True)
    assert torch.equal(torch.load(path), torch.arange(5.0)) and os.listdir(tmp_path) == ["x.pt"]
