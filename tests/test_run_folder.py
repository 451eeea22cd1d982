"""Nothing lost, round two (run_folder.py): the shared cache built once while other runs wait, stage logs that
describe every image across restarts, evaluate.py refusing a folder a live run holds, every input checked before
the folder is claimed, and damaged files named (or regenerated) in one line."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import curriculum
import distill
import evaluate
from common import UserError, save_png
from conftest import REPO, cli, file_hashes, one_error_line, tree
from curriculum import Plan, Students, run_stages
from data import get_spec
from guidance import GuidanceConfig, SamplerConfig
from model import load_prior, make_student
from run_folder import LOCK, Lock, cache_entry
from train_student import reference_spec

SPEC = get_spec("digits")
ENV = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
# a small guided LGD run on the random pixel prior (the window must hold a step of the 4)
LGD = ["--dataset", "digits", "--ipc", 2, "--stage-ipc", 1, "--steps", 4, "--guide-from", 0, "--guide-until", 3,
       "--student-epochs", 1, "--reference-epochs", 1, "--no-eval"]


def python(code, *args):
    """A Python process running `code` with the repo importable (stdout/stderr captured)."""
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# ----------------------------------------------------------------------------- the shared cache

def test_two_first_runs_at_once_train_the_digits_prior_once(tmp_path):
    """Both processes ask for the prior at the same moment: one trains it, the other says it waits (naming the
    trainer's pid), then reuses it; both finish, nothing half-written or locked is left in the cache."""
    go = tmp_path / "go"
    code = ("import os, sys, time\n"
            "while not os.path.exists(sys.argv[2]): time.sleep(0.01)\n"
            "from train_prior import digits_prior\n"
            "print('path', digits_prior(sys.argv[1], steps=60))")
    # import torch first, so both reach the prior together when `go` appears
    procs = [python("import torch\n" + code, tmp_path / "cache", go) for _ in range(2)]
    time.sleep(8)
    go.write_text("")
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trained = [i for i, (out, _) in enumerate(outs) if "training the digits prior once" in out]
    assert len(trained) == 1, outs  # trained once
    waiter = outs[1 - trained[0]][0]
    assert f"pid {procs[trained[0]].pid}" in waiter and "waiting for the digits prior" in waiter
    assert os.listdir(tmp_path / "cache") == ["digits_prior"]  # no lock, no temporary, no partial training state
    assert load_prior(str(tmp_path / "cache" / "digits_prior")).image_size == 8


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


HOLD = ("import sys, time\nfrom run_folder import Lock\nlock = Lock(sys.argv[1])\nlock.acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
        "import os\nos.makedirs(sys.argv[3], exist_ok=True)\nlock.release()\n")


def test_a_cache_entry_waits_for_a_live_builder_and_reuses_its_work(tmp_path, capsys):
    entry = tmp_path / "digits_prior"
    holder = python(HOLD, tmp_path / f".digits_prior{LOCK}", 2, entry)
    assert holder.stdout.readline().strip() == "held"
    with cache_entry(str(entry), "the digits prior") as missing:
        assert not missing  # built by the other process while we waited
    out = capsys.readouterr().out
    assert f"waiting for the digits prior: {entry} is being built by pid {holder.pid}" in out
    assert holder.wait(timeout=60) == 0 and not (tmp_path / f".digits_prior{LOCK}").exists()


def test_a_killed_builders_lock_is_taken_over_and_its_temporaries_go(tmp_path, capsys):
    entry = tmp_path / "digits_prior"
    holder = python(HOLD, tmp_path / f".digits_prior{LOCK}", 600, entry)
    assert holder.stdout.readline().strip() == "held"
    (tmp_path / f".digits_prior.lgd-tmp-{holder.pid}").mkdir()  # its half-renamed prior
    (tmp_path / "notes.lgd-tmp").write_text("a user's file")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    start = time.time()
    with cache_entry(str(entry), "the digits prior") as missing:
        assert missing and time.time() - start < 5  # no waiting for a dead process
        assert json.loads((tmp_path / f".digits_prior{LOCK}").read_text())["pid"] == os.getpid()
    assert "waiting" not in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["notes.lgd-tmp"]  # the dead builder's temporary went, nothing else


# ----------------------------------------------------------------------------- stage logs that survive restarts

def stage_run(prior, out_dir, **kwargs):
    torch.manual_seed(0)
    reference = [(make_student("convnet", SPEC).eval(), reference_spec(SPEC))]
    guide = GuidanceConfig(scale=50.0, deviation=1.0, candidates=2, guide_from=1, guide_until=4)
    return run_stages(prior, SPEC, str(out_dir), Plan(ipc=4, stage_ipc=2, seed=5, batch_size=20),
                      SamplerConfig(cfg_scale=2.0, steps=6), guide, Students("convnet", "minimax", SPEC, epochs=2),
                      reference, **kwargs)


@pytest.fixture(scope="module")
def straight(pixel_prior, tmp_path_factory):
    """An uninterrupted 2-stage run: the logs every restarted run must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    stage_run(load_prior(pixel_prior), out)
    return out


class Killed(Exception):
    pass


def test_a_stage_killed_mid_sampling_logs_every_image_after_the_rerun(straight, pixel_prior, tmp_path, monkeypatch):
    prior, original, calls = load_prior(pixel_prior), curriculum._generate_chunk, []

    def dies_in_stage_1(*args, **kwargs):  # the first slot's chunk of stage 1 is written, then the process dies
        if any("stage_1" in str(a) for a in args):
            calls.append(1)
            if len(calls) == 2:
                raise Killed()
        return original(*args, **kwargs)
    monkeypatch.setattr(curriculum, "_generate_chunk", dies_in_stage_1)
    with pytest.raises(Killed):
        stage_run(prior, tmp_path / "run")
    assert len(file_hashes(tmp_path / "run" / "stage_1" / "images")) == 10  # half the stage
    monkeypatch.setattr(curriculum, "_generate_chunk", original)
    stage_run(prior, tmp_path / "run")
    log = json.loads((tmp_path / "run" / "stage_1" / "log.json").read_text())
    assert log["images_logged"] == 20 and sum(log["kept_candidate_counts"]) == 20
    assert log == json.loads((straight / "stage_1" / "log.json").read_text())  # as if it had never died


def test_a_stage_rerun_from_its_images_rewrites_the_same_log(straight, pixel_prior, tmp_path):
    import shutil
    run = shutil.copytree(straight, tmp_path / "run")
    os.remove(run / "stage_1" / "done.json")  # every image is there; the stage is finished again from disk
    before = (run / "stage_1" / "log.json").read_bytes()
    os.remove(run / "stage_1" / "log.json")
    stage_run(load_prior(pixel_prior), run)
    assert (run / "stage_1" / "log.json").read_bytes() == before
    assert json.loads(before)["images_logged"] == 20 and json.loads(before)["kept"]["S"] is not None


# ----------------------------------------------------------------------------- evaluate.py and a busy folder

def digits_set(folder, ipc=2, classes=range(10)):
    for n, c in enumerate(classes):
        for i in range(ipc):
            save_png(torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(10 * n + i)),
                     str(folder / str(c) / f"{i:05d}.png"))
    return folder


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


# ----------------------------------------------------------------------------- a refused start writes nothing

def broken_seed_set(root, case):
    """A seed set that must be refused, and what the refusal names: a class folder missing, a file PIL cannot
    read, a class folder with no image."""
    folder = digits_set(root / case, ipc=1, classes=range(9) if case == "missing" else range(10))
    if case == "unreadable":
        (folder / "4" / "00000.png").write_bytes(b"\x89PNG truncated")
    if case == "empty":
        os.remove(folder / "6" / "00000.png")
    return folder, {"missing": "has no folder '9'", "unreadable": "cannot read image", "empty": "class '6' has no"}[case]


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
    run.mkdir()
    (run / "args.json").write_text(json.dumps(dict(dataset="digits")))  # an earlier run's folder: left as it was
    before = {p: (run / p).read_bytes() for p in tree(run)}
    code, lines = cli(distill.main, [*LGD, "--prior", pixel_prior, "--reference", tmp_path / "notes.txt",
                                     "--out-dir", run], capsys)
    one_error_line(code, lines, f"--reference {tmp_path / 'notes.txt'} is not a PyTorch weights file")
    assert "remove" not in lines[-1] and "cache" not in lines[-1]  # the user's file is not ours to delete
    assert {p: (run / p).read_bytes() for p in tree(run)} == before
    # the plan refuses what the run refuses: --dry-run loads the file too
    one_error_line(*cli(distill.main, [*LGD, "--prior", pixel_prior, "--reference", tmp_path / "notes.txt", "--dry-run",
                                       "--out-dir", run], capsys), "is not a PyTorch weights file")


def minimax_names(state):
    """Our ConvNet's state dict under MinimaxDiffusion `train_models/convnet.py`'s names, in its order (a ModuleDict
    of lists: every conv first, then every norm), inside DD_IGD's checkpoint dict with DataParallel prefixes."""
    convs = {k.replace(f"features.{k.split('.')[1]}", f"layers.conv.{int(k.split('.')[1]) // 4}"): v
             for k, v in state.items() if k.startswith("features.") and int(k.split(".")[1]) % 4 == 0}
    norms = {k.replace(f"features.{k.split('.')[1]}", f"layers.norm.{int(k.split('.')[1]) // 4}"): v
             for k, v in state.items() if k.startswith("features.") and int(k.split(".")[1]) % 4 == 1}
    rest = {k: v for k, v in state.items() if not k.startswith("features.")}
    return {"state_dict": {f"module.{k}": v for k, v in {**convs, **norms, **rest}.items()}, "epoch": 50}


def test_minimaxs_key_layouts_are_read_and_a_misfit_names_what_it_expected(tmp_path):
    """Minimax's ConvNet names its tensors layers.conv.<d> / layers.norm.<d>; its ResNetAP-10 layer0.conv1 ...
    layer4.0.downsample.2, fc (the same tensors as ours, in the same order). Both load, with the same outputs."""
    from train_student import reference_model
    view = reference_spec(SPEC)
    theirs = make_student("convnet", view, seed=7)
    torch.save(minimax_names(theirs.state_dict()), tmp_path / "convnet.pth.tar")
    model, _ = reference_model(SPEC, "convnet", None, "cpu", path=str(tmp_path / "convnet.pth.tar"))
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(model(x), theirs.eval()(x))
    resnet = make_student("resnetap10", view, seed=3)
    renamed = {f"layer{n}.{k}": v for n, (k, v) in enumerate(resnet.state_dict().items())}  # other names, same order
    torch.save(renamed, tmp_path / "resnetap.pt")
    model, _ = reference_model(SPEC, "resnetap10", None, "cpu", path=str(tmp_path / "resnetap.pt"))
    assert torch.equal(model(x), resnet.eval()(x))
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"does not fit --arch convnet at 8 px: expected 10 tensors starting "
                                        r"features.0.weight \(128, 1, 3, 3\), found 1; the first difference: "
                                        r"expected features.0.weight \(128, 1, 3, 3\), found conv.weight \(3, 3\)"):
        reference_model(SPEC, "convnet", None, "cpu", path=str(tmp_path / "other.pt"))


def test_igds_replay_buffer_is_a_reference_as_it_is(tmp_path):
    """IGD saves its surrogate as MTT-style replay buffers ([trajectory][epoch][parameters]): the last epoch of the
    first trajectory is theta*."""
    from train_student import reference_model
    view = reference_spec(SPEC)
    snapshots = [[p.detach().clone() for p in make_student("convnet", view, seed=s).parameters()] for s in range(3)]
    torch.save([snapshots, snapshots[:1]], tmp_path / "replay_buffer_0.pt")
    model, _ = reference_model(SPEC, "convnet", None, "cpu", path=str(tmp_path / "replay_buffer_0.pt"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), snapshots[-1]))
    torch.save({"state_dict": {f"module.{k}": v for k, v in make_student("convnet", view, seed=7).state_dict().items()},
                "epoch": 50}, tmp_path / "checkpoint.pth.tar")  # DD_IGD train.py's checkpoint, DataParallel names
    model, _ = reference_model(SPEC, "convnet", None, "cpu", path=str(tmp_path / "checkpoint.pth.tar"))
    expected = make_student("convnet", view, seed=7).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- damaged files: one line, or regenerated

@pytest.fixture
def finished(tmp_path, pixel_prior, capsys, monkeypatch):
    """A finished 3-stage LGD run folder (argv, folder)."""
    monkeypatch.chdir(tmp_path)
    argv = [*LGD, "--ipc", 3, "--prior", pixel_prior, "--out-dir", tmp_path / "run"]
    assert cli(distill.main, argv, capsys)[0] == 0
    return argv, tmp_path / "run"


def test_a_damaged_latent_of_a_finished_stage_names_the_stages_to_delete(finished, capsys):
    argv, run = finished
    latent = run / "stage_0" / "latents" / "3" / "00000.pt"
    latent.write_bytes(latent.read_bytes()[:40])  # truncated
    os.remove(run / "stage_2" / "done.json")  # stage 2 builds its memory from stages 0 and 1 again
    one_error_line(*cli(distill.main, argv, capsys), f"{latent} is damaged", f"delete {run / 'stage_0'}")


def test_a_damaged_student_is_trained_again(finished, capsys):
    argv, run = finished
    student = run / "stage_1" / "student.pt"
    saved = torch.load(student)
    student.write_bytes(student.read_bytes()[:100])
    os.remove(run / "stage_1" / "done.json")
    out = []
    assert cli(distill.main, argv, capsys, out)[0] == 0
    assert f"stage 1's student {student} is damaged (" in out[0] and "regenerating it" in out[0]
    again = torch.load(student)
    assert all(torch.equal(saved[k], again[k]) for k in saved)  # the same student: seeded, deterministic
