"""The stage loop (curriculum.py) as a run lives it: T_1, then per stage a student on D_k and a guided increment;
killed at any moment and rerun, it ends in the very files of a run that was never killed; the paper's pipeline,
DDP ranks, out-of-memory."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import curriculum
import distill
from conftest import LGD, REPO, cli, file_hashes, in_process, one_error_line, run_cli, run_signalled, tree
from curriculum import Plan, Seed, Students, run_stages
from data import IMAGEWOOF, get_spec
from ground.common import load_json
from ground.run import Increment, Run
from guidance import (
    GuidanceConfig,
    Learnability,
    SamplerConfig,
)
from model import load_prior, make_student
from reference import reference_view
from train_student import Trainer

SPEC = get_spec("digits")


GUIDE = GuidanceConfig(scale=50.0, deviation=1.0, candidates=2, guide_from=1, guide_until=4)


def stage_loop(prior, out_dir, ipc=3, stage_ipc=1):
    """The stage loop on the stand-in prior, as distill.py calls it: a run folder (ground.run.Run) for a small plan,
    T_1 the unguided DiT increment."""
    torch.manual_seed(0)
    reference = (make_student("convnet", SPEC).eval(), reference_view(SPEC))
    plan, sampler = Plan(ipc=ipc, stage_ipc=stage_ipc, seed=5), SamplerConfig(cfg_scale=2.0, steps=6)
    spec = get_spec("digits")
    spec.image_size = prior.image_size
    run = Run(str(out_dir), spec, plan, batch=20)
    run_stages(run, prior, plan, sampler, GUIDE, Students("convnet", "minimax", SPEC, Trainer(), epochs=2), reference,
               Seed("dit"))


class Killed(Exception):
    pass


def test_stage_loop_three_stages_kill_and_resume(pixel_prior, tmp_path, monkeypatch):
    prior = load_prior(pixel_prior)
    run = str(tmp_path / "run")
    stage_student = curriculum.stage_student

    def killed_at_stage_2(run, k, *args, **kwargs):
        if k == 2:
            raise Killed()
        return stage_student(run, k, *args, **kwargs)
    monkeypatch.setattr(curriculum, "stage_student", killed_at_stage_2)
    with pytest.raises(Killed):
        stage_loop(prior, run)
    assert os.path.exists(f"{run}/stage_1/done.json") and not os.path.exists(f"{run}/stage_2")
    before = {k: file_hashes(f"{run}/stage_{k}") for k in (0, 1)}
    monkeypatch.setattr(curriculum, "stage_student", stage_student)

    stage_loop(prior, run)  # the rerun resumes at stage 2 and completes
    for k in (0, 1):
        assert file_hashes(f"{run}/stage_{k}") == before[k]  # finished stages untouched
    plan = Plan(ipc=3, stage_ipc=1, seed=5)
    for k in range(3):
        d_k = curriculum.union(Run(run, SPEC, plan, batch=20), k + 1)[0]  # D_{k+1}: its last 10 files are stage k's
        files = sorted(os.path.relpath(p, f"{run}/stage_{k}/images") for p in d_k[-10:])
        assert files == [f"{c}/{k:05d}.png" for c in range(10)]  # stage k holds index k of every class
        assert os.path.exists(f"{run}/stage_{k}/grid.png") and os.path.exists(f"{run}/stage_{k}/done.json")
    # the student of stage k was trained on exactly the union of stages < k
    for k in (1, 2):
        trained_on = sorted(load_json(f"{run}/stage_{k}/student.json")["train_files"])
        union = sorted(f"stage_{j}/images/{c}/{j:05d}.png" for j in range(k) for c in range(10))  # in the folder
        assert trained_on == union
    assert not os.path.exists(f"{run}/stage_0/student.pt")  # the seed stage has no student
    # the union is the distilled set: 3 images per class, indices 0..2
    for c in range(10):
        assert sorted(os.listdir(f"{run}/distilled/{c}")) == ["00000.png", "00001.png", "00002.png"]


def test_stage_zero_is_the_unguided_dit_increment(pixel_prior, tmp_path):
    """Paired comparison: LGD's seed stage equals the first images of --method dit with the same seed."""
    prior = load_prior(pixel_prior)
    stage_loop(prior, tmp_path / "lgd", ipc=1)
    plan = Plan(ipc=1, stage_ipc=1, seed=5)
    run = Run(str(tmp_path / "dit"), SPEC, plan, batch=20)
    curriculum.generate_increment(run, run.one_pass(latents=False), prior, plan, SamplerConfig(cfg_scale=2.0, steps=6))
    assert file_hashes(tmp_path / "lgd" / "distilled") == file_hashes(tmp_path / "dit" / "distilled")


def test_distill_lgd_cli_on_fake_imagewoof(tmp_path, latent_prior, fake_woof):
    """The full lgd path with a latent prior (VAE decode/encode in the loop): 2 stages of 1 IPC."""
    out = tmp_path / "run"
    woof = ["--dataset", "imagewoof", "--no-preflight", "--data-dir", fake_woof, "--prior", latent_prior, "--seed-set",
            "dit", "--ipc", 2, "--stage-ipc", 1, "--res", 16, "--out-dir", out]
    r = in_process("distill.py", *woof, "--steps", 4, "--guide-from", 0, "--guide-until", 3, "--batch-size", 12,
                   "--student-epochs", 2, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for wnid in sorted(os.listdir(out / "distilled")):
        assert sorted(os.listdir(out / "distilled" / wnid)) == ["00000.png", "00001.png"]
    assert json.loads((out / "stage_1" / "done.json").read_text())["indices"] == [1, 2]
    assert (out / "stage_1" / "student.pt").exists() and (out / "grid.png").exists()
    assert list((tmp_path / "out" / "cache").glob("surrogate_imagewoof_convnet_res16_*.pt"))  # theta* cached
    # rerunning into the same folder with different settings is refused instead of mixing two runs
    r = in_process("distill.py", *woof, "--guidance-scale", 3, cwd=tmp_path)
    assert r.returncode == 1 and "different" in r.stderr and "--guidance-scale" in r.stderr


def test_stages_save_final_latents_and_a_log_of_what_guidance_did(pixel_prior, tmp_path):
    prior = load_prior(pixel_prior)
    run = tmp_path / "run"
    stage_loop(prior, run)
    for k in range(3):
        for c in range(10):
            latent = torch.load(run / f"stage_{k}" / "latents" / str(c) / f"{k:05d}.pt")
            from data import load_image
            image = load_image(str(run / f"stage_{k}" / "images" / str(c) / f"{k:05d}.png"), 1)
            # pixel space: the saved final latent is the image before clamping and 8-bit rounding
            assert latent.shape == (1, 8, 8)
            assert (((latent.clamp(-1, 1) + 1) / 2 - image).abs() <= 0.5 / 255 + 1e-6).all()
    assert not (run / "stage_0" / "log.json").exists()  # the seed stage is not guided
    for k in (1, 2):
        log = json.loads((run / f"stage_{k}" / "log.json").read_text())
        assert log["images_logged"] == 10 and sum(log["kept_candidate_counts"]) == 10
        assert log["kept"]["S"] >= log["rejected"]["S"]  # the kept candidate has the highest S of its slot
        assert set(log["kept"]) == set(log["rejected"]) == {"S", "student_ce", "reference_ce"}
        assert json.loads((run / f"stage_{k}" / "done.json").read_text())["sampler_batch"] == 20


def test_out_of_memory_halves_the_batch_and_keeps_the_images(pixel_prior, tmp_path, monkeypatch, capsys):
    """A batch that does not fit raises OutOfMemoryError: the block is retried at half the batch, and the
    images are those of an unconstrained run (each is seeded on its own; equal up to float rounding)."""
    from data import load_image
    prior = load_prior(pixel_prior)
    torch.manual_seed(0)
    score = Learnability(make_student("convnet", SPEC, seed=1), SPEC, make_student("convnet", SPEC).eval(),
                         reference_view(SPEC), 0.5)
    guide = GuidanceConfig(scale=50.0, deviation=1.0, candidates=2, guide_from=1, guide_until=4)
    plan = Plan(ipc=5, stage_ipc=5, seed=5)

    def run(folder):  # slots 3 and 4 of every class, guided, M_c starting empty; returns the batch that fitted
        out = Run(str(folder), SPEC, plan, batch=20)
        inc = Increment(SPEC, str(folder / "images"), str(folder / "latents"), None, range(3, 5))
        curriculum.generate_increment(out, inc, prior, plan, SamplerConfig(cfg_scale=2.0, steps=6), score, guide, {})
        return out.batch
    straight = run(tmp_path / "straight")
    original = curriculum.best_of_candidates

    def small_device(prior, labels, *rest, **kw):
        if len(labels) > 4:  # "the GPU" holds 4 samples
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(prior, labels, *rest, **kw)
    monkeypatch.setattr(curriculum, "best_of_candidates", small_device)
    halved = run(tmp_path / "halved")
    assert straight == 20 and halved == 5  # 20 -> 10 -> 5 (two classes x two candidates)
    assert capsys.readouterr().out.count("sampler batch halved") == 2  # said once per halving
    for c in range(10):
        for index in (3, 4):
            a, b = (load_image(str(tmp_path / d / "images" / str(c) / f"{index:05d}.png"), 1)
                    for d in ("straight", "halved"))
            assert (a - b).abs().max() <= 1 / 255 + 1e-6


def test_distill_dit_on_fake_imagewoof_with_tiny_prior(tmp_path, latent_prior, fake_woof):
    out = tmp_path / "run"
    r = in_process("distill.py", "--dataset", "imagewoof", "--method", "dit", "--no-preflight", "--ipc", 2,
                   "--data-dir", fake_woof,
                "--prior", latent_prior, "--steps", 3, "--batch-size", 8, "--out-dir", out, "--res", 16, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    classes = sorted(os.listdir(out / "distilled"))
    assert classes == sorted(IMAGEWOOF)
    for wnid in classes:
        files = sorted(os.listdir(out / "distilled" / wnid))
        assert files == ["00000.png", "00001.png"]
        with Image.open(out / "distilled" / wnid / files[0]) as im:
            assert im.size == (16, 16) and im.mode == "RGB"
    args = json.loads((out / "args.json").read_text())
    assert args["method"] == "dit" and args["ipc"] == 2 and "git_commit" in args
    assert (out / "grid.png").exists()
    # the ImageWoof preset's seed set is IGD's, but a DiT set samples no IGD increment: nothing was trained for it
    cache = [f.name for f in (tmp_path / "out" / "cache").iterdir()]  # the data tree's images-opened marker only
    assert len(cache) == 1 and cache[0].startswith("images_checked_") and not (out / "igd.json").exists()
    # a rerun skips the images already written (their bytes and times are unchanged)
    before = {p: os.stat(out / "distilled" / p).st_mtime_ns for p in ["n02086240/00000.png"]}
    r = in_process("distill.py", "--dataset", "imagewoof", "--method", "dit", "--no-preflight", "--ipc", 2,
                   "--data-dir", fake_woof,
                "--prior", latent_prior, "--steps", 3, "--batch-size", 8, "--out-dir", out, "--res", 16, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert before == {p: os.stat(out / "distilled" / p).st_mtime_ns for p in before}


def test_igd_and_the_papers_pipeline_end_to_end(tmp_path, latent_prior, fake_woof):
    """`--method igd` and `--method lgd --seed-set igd` on the tiny latent prior (VAE in the loop): IGD's
    chosen checkpoints are written, and stage 0 of the paper's pipeline is IGD's first increment, byte for byte."""
    common = ["--dataset", "imagewoof", "--no-preflight", "--data-dir", fake_woof, "--prior", latent_prior, "--res",
              16, "--steps", 6, "--set", "igd_from=1", "--set", "igd_until=4", "--set", "grad_ipc=3",
              "--reference-epochs", 3, "--batch-size", 10]
    r = in_process("distill.py", *common, "--method", "igd", "--ipc", 2, "--stage-ipc", 1, "--out-dir",
                   tmp_path / "igd",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "igd" / "igd.json").read_text())
    assert info["checkpoints"][0] == 0 and info["trajectory_length"] == 4 and info["grad_ipc"] == 3
    assert len(file_hashes(tmp_path / "igd" / "distilled", ".png")) == 20 and (tmp_path / "igd" / "latents").is_dir()
    r = in_process("distill.py", *common, "--seed-set", "igd", "--ipc", 2, "--stage-ipc", 1, "--guide-from", 1,
                "--guide-until", 4, "--student-epochs", 2, "--out-dir", tmp_path / "lgd", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    igd_first = {k: v for k, v in file_hashes(tmp_path / "igd" / "distilled",
                                              ".png").items() if k.endswith("00000.png")}
    assert file_hashes(tmp_path / "lgd" / "stage_0" / "images", ".png") == igd_first
    assert len(file_hashes(tmp_path / "lgd" / "distilled", ".png")) == 20
    # a hard-coded list, as IGD's released sampler uses, instead of the rule
    r = in_process("distill.py", *common, "--method", "igd", "--ipc", 1, "--set", "igd_checkpoints=0,3",
                "--out-dir", tmp_path / "list", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "list" / "igd.json").read_text())["checkpoints"] == [0, 3]
    r = in_process("distill.py", *common, "--method", "igd", "--ipc", 1, "--set", "igd_checkpoints=0,52",
                   "--out-dir", tmp_path / "bad", cwd=tmp_path)  # IGD's released 1K list: a snapshot not there
    assert r.returncode == 1 and "snapshots 0..3" in r.stderr.strip().splitlines()[-1]


def lgd_argv(prior, out, *extra):
    return ["--dataset", "digits", "--prior", prior, "--ipc", 4, "--stage-ipc", 2, "--steps", 6, "--guide-from", 0,
            "--guide-until", 5, "--student-epochs", 2, "--reference-epochs", 1, "--no-eval", "--out-dir", out, *extra]


@pytest.fixture(scope="module")
def uninterrupted(pixel_prior, tmp_path_factory):
    """An LGD run that was never killed (stages 0 and 1: T_1 unguided, T_2 guided): every rerun must end in its
    bytes."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cwd = os.getcwd()
    os.chdir(root)  # theta*'s cache lands under this folder's out/cache
    try:
        code = distill.main([str(a) for a in lgd_argv(pixel_prior, root / "ref")])
    finally:
        os.chdir(cwd)
    assert code is None
    return root


def cut(run, spec):
    """Delete what a kill at a given moment would not have written yet (paths relative to the run folder)."""
    for path in spec:
        target = run / path
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            os.remove(target)


CLASS_FILES = ["images/{c}/{i:05d}.png", "latents/{c}/{i:05d}.pt", "records/{c}/{i:05d}.json"]


STAGE_1_UNFINISHED = ["stage_1/done.json", "stage_1/log.json", "stage_1/grid.png", "distilled", "grid.png"] + \
    [f"stage_1/{f.format(c=c, i=3)}" for c in range(10) for f in CLASS_FILES]


@pytest.mark.parametrize("killed", [
    # the issue's moment: slot 2 of stage 1 being written, class 9's latent saved, its record and PNG not
    ["stage_1/images/9/00002.png", "stage_1/records/9/00002.json"],
    # the first file of that chunk written (class 0's latent), nothing else
    [f"stage_1/{f.format(c=c, i=2)}" for c in range(10) for f in CLASS_FILES if not (c == 0 and "latents" in f)],
    # the README's remedy for a damaged latent of the stage being sampled: delete it and its PNG
    ["stage_1/latents/5/00002.pt", "stage_1/images/5/00002.png"],
])
def test_a_rerun_after_a_kill_at_any_moment_is_byte_identical(uninterrupted, pixel_prior, tmp_path, monkeypatch,
                                                              capsys, killed):
    monkeypatch.chdir(uninterrupted)  # the same theta* cache
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "ref", run)
    cut(run, killed + STAGE_1_UNFINISHED)
    assert cli(distill.main, lgd_argv(pixel_prior, run), capsys)[0] == 0
    expected = {k: v for k, v in file_hashes(uninterrupted / "ref").items() if k != "args.json"}
    assert {k: v for k, v in file_hashes(run).items() if k != "args.json"} == expected


def test_a_file_that_is_not_what_the_rerun_computes_is_named(uninterrupted, pixel_prior, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(uninterrupted)
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "ref", run)
    torch.save(torch.zeros(1, 8, 8), run / "stage_1" / "latents" / "3" / "00002.pt")  # edited by hand
    cut(run, ["stage_1/images/9/00002.png"] + STAGE_1_UNFINISHED)  # killed: slot 2 is recomputed and checked
    code, lines = cli(distill.main, lgd_argv(pixel_prior, run), capsys)
    one_error_line(code, lines, "stage_1/latents/3/00002.pt is not what this run computes",
                   f"delete {run / 'stage_1'} and the later stages")


def test_a_full_disk_is_one_line_naming_the_file_and_the_rerun_completes(uninterrupted, pixel_prior, tmp_path,
                                                                        monkeypatch, capsys):
    import resource
    monkeypatch.chdir(uninterrupted)
    run = tmp_path / "run"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300 * 1024, hard))  # `ulimit -f 300`: the student (600 kB) won't fit
    try:
        code, lines = cli(distill.main, lgd_argv(pixel_prior, run), capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    one_error_line(code, lines, f"error: disk full: {run / 'stage_1' / 'student.pt'}")
    assert not [f for f in tree(run) if "lgd-tmp" in f]  # the half-written temporary is gone
    assert cli(distill.main, lgd_argv(pixel_prior, run), capsys)[0] == 0  # with room again, the rerun completes
    mine = ("args.json",)  # each start appends itself
    expected = {k: v for k, v in file_hashes(uninterrupted / "ref").items() if k not in mine}
    assert {k: v for k, v in file_hashes(run).items() if k not in mine} == expected


def test_a_damaged_record_names_its_way_out_and_a_deleted_one_is_recomputed(uninterrupted, pixel_prior, tmp_path,
                                                                           monkeypatch, capsys):
    monkeypatch.chdir(uninterrupted)
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "ref", run)
    cut(run, STAGE_1_UNFINISHED[:3] + ["distilled", "grid.png"])  # killed before stage 1's done.json
    record = run / "stage_1" / "records" / "2" / "00002.json"
    record.write_text(record.read_text()[:40])  # truncated
    one_error_line(*cli(distill.main, lgd_argv(pixel_prior, run), capsys), f"{record} is not what this run computes",
                   "to sample it again")
    os.remove(record)  # its image is sampled again in the same batch, the record rewritten
    assert cli(distill.main, lgd_argv(pixel_prior, run), capsys)[0] == 0
    log = json.loads((run / "stage_1" / "log.json").read_text())
    assert log["images_logged"] == 20 and (run / "stage_1" / "log.json").read_bytes() == \
        (uninterrupted / "ref" / "stage_1" / "log.json").read_bytes()


def test_a_finished_stages_image_that_is_not_the_runs_is_refused(uninterrupted, pixel_prior, tmp_path, monkeypatch,
                                                                 capsys):
    from ground.common import save_png
    monkeypatch.chdir(uninterrupted)
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "ref", run)
    cut(run, ["stage_1", "distilled", "grid.png"])
    save_png(torch.rand(3, 8, 8), str(run / "stage_0" / "images" / "6" / "00001.png"))  # recoloured
    one_error_line(*cli(distill.main, lgd_argv(pixel_prior, run), capsys),
                   "stage 0: 1 files are missing or not what the run made", "6/00001.png", "delete them and")


def test_a_seed_set_image_of_another_mode_or_size_is_passed_over(tmp_path, capsys):
    from data import get_spec
    from ground.common import save_png
    from ground.folder import seed_set_files
    for c in range(10):
        for i in range(3):
            save_png(torch.rand(1, 8, 8), str(tmp_path / "seed" / str(c) / f"{i}.png"))
    save_png(torch.rand(3, 8, 8), str(tmp_path / "seed" / "2" / "0.png"))  # recoloured
    save_png(torch.rand(1, 12, 12), str(tmp_path / "seed" / "5" / "1.png"))  # resized
    chosen = seed_set_files(str(tmp_path / "seed"), get_spec("digits"), 2)
    assert [os.path.basename(p) for p in chosen[2]] == ["1.png", "2.png"]
    assert [os.path.basename(p) for p in chosen[5]] == ["0.png", "2.png"]
    note = capsys.readouterr().out
    assert "2 images of seed set" in note and "2/0.png" in note and "5/1.png" in note


def stage_run(prior, out_dir):
    stage_loop(prior, out_dir, ipc=4, stage_ipc=2)


@pytest.fixture(scope="module")
def straight(pixel_prior, tmp_path_factory):
    """An uninterrupted 2-stage run: the logs every restarted run must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    stage_run(load_prior(pixel_prior), out)
    return out


def test_a_stage_killed_mid_sampling_logs_every_image_after_the_rerun(straight, pixel_prior, tmp_path, monkeypatch):
    prior, original = load_prior(pixel_prior), curriculum.sample_images

    def dies_in_stage_1(prior, spec, classes, index, *args, **kwargs):  # slot 2 of stage 1 is written, then the kill
        if index == 3:
            raise Killed()
        return original(prior, spec, classes, index, *args, **kwargs)
    monkeypatch.setattr(curriculum, "sample_images", dies_in_stage_1)
    with pytest.raises(Killed):
        stage_run(prior, tmp_path / "run")
    assert len(file_hashes(tmp_path / "run" / "stage_1" / "images")) == 10  # half the stage
    monkeypatch.setattr(curriculum, "sample_images", original)
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
    one_error_line(*cli(distill.main, argv, capsys), "stage 0: 1 files", str(latent),
                   f"delete them and {run / 'stage_0' / 'done.json'}")


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


def test_a_done_stage_with_a_deleted_image_is_one_line(tmp_path, pixel_prior, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", "digits", "--prior", pixel_prior, "--ipc", 2, "--stage-ipc", 1, "--steps", 4,
            "--student-epochs",
            1, "--reference-epochs", 1, "--no-eval", "--guide-from", 0, "--guide-until", 3, "--out-dir", tmp_path / "r"]
    assert cli(distill.main, argv, capsys)[0] == 0
    os.remove(tmp_path / "r" / "stage_0" / "images" / "7" / "00000.png")
    one_error_line(*cli(distill.main, argv, capsys), "stage 0: 1 files are missing", "7/00000.png", "delete them and")


ARGS = ["--dataset", "imagewoof", "--no-preflight", "--seed-set", "dit", "--ipc", 3, "--stage-ipc", 1, "--steps", 8,
        "--guide-from", 0, "--guide-until", 7,
        "--batch-size", 12, "--student-epochs", 3, "--res", 16]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, latent_prior, fake_woof):
    """One uninterrupted single-process lgd run: the reference every other run must reproduce."""
    cwd = tmp_path_factory.mktemp("straight")
    r = run_cli("distill.py", *ARGS, "--data-dir", fake_woof, "--prior", latent_prior, "--out-dir", cwd / "run",
                cwd=cwd)
    assert r.returncode == 0, r.stderr
    return cwd / "run"


def torchrun(*args, cwd):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           os.path.join(REPO, "distill.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path, straight_run, latent_prior, fake_woof):
    """Generation is sharded by global image index: the seed stage is the same bytes whatever the number of ranks, and
    the run completes with every image. (The per-stage students are DDP students under torchrun: they see other
    batches than one process's, so later stages differ; that every rank guides with rank 0's weights and BatchNorm
    statistics is tests/test_gpu_paths.py's DDP test.)"""
    r = torchrun(*ARGS, "--data-dir", fake_woof, "--prior", latent_prior, "--out-dir", tmp_path / "ddp", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert file_hashes(tmp_path / "ddp" / "stage_0", ".png") == file_hashes(straight_run / "stage_0", ".png")
    assert len(file_hashes(tmp_path / "ddp" / "distilled", ".png")) == len(file_hashes(straight_run / "distilled",
                                                                                       ".png")) == 30
    assert json.loads((tmp_path / "ddp" / "args.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_kill_minus_nine_then_resume(tmp_path, straight_run, latent_prior, fake_woof):
    """A process killed mid-stage: the rerun finishes, finished files are untouched, and the final set is
    byte-identical to an uninterrupted run (memories are rebuilt from disk, students reloaded)."""
    out = tmp_path / "run"
    # killed (SIGKILL, no cleanup at all) mid stage 1, at a moment fixed in advance: its student is saved, the first
    # of its images is being written
    r = run_signalled("ground.run:Increment.write", "'stage_1' in a[0].images_dir", "SIGKILL", *ARGS, "--data-dir",
                      fake_woof, "--prior", latent_prior, "--out-dir", out, cwd=tmp_path)
    assert r.returncode == -signal.SIGKILL
    assert (out / "stage_1" / "student.pt").exists() and not (out / "stage_1" / "images").exists()
    assert not (out / "stage_2").exists() and (out / "stage_0" / "done.json").exists()
    stage0 = {p: os.stat(out / "stage_0" / p).st_mtime_ns for p in file_hashes(out / "stage_0", ".png")}

    r = run_cli("distill.py", *ARGS, "--data-dir", fake_woof, "--prior", latent_prior, "--out-dir", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert stage0 == {p: os.stat(out / "stage_0" / p).st_mtime_ns for p in stage0}  # not rewritten
    assert file_hashes(out / "distilled", ".png") == file_hashes(straight_run / "distilled", ".png")
    leftovers = [f for _, _, files in os.walk(out) for f in files if ".tmp" in f]
    assert not leftovers  # no half-written file survives a rerun's reads


def test_memory_starts_as_d_k_final_latents_and_grows_slot_by_slot(pixel_prior, tmp_path):
    """M_c after initial_memory: the final latents of D_k's class-c images, stage by stage (capped to the newest);
    after each slot of a guided increment, the latent kept for that slot joins M_c."""
    prior = load_prior(pixel_prior)
    stage_loop(prior, tmp_path / "run")  # 3 stages of 1 image per class
    plan = Plan(ipc=5, stage_ipc=1, seed=5)
    run = Run(str(tmp_path / "run"), SPEC, plan, batch=20)
    stored = lambda k, c: torch.load(tmp_path / "run" / f"stage_{k}" / "latents" / str(c) / f"{k:05d}.pt")
    memory = curriculum.initial_memory(run, 3, cap=64)
    assert sorted(memory) == list(range(10))
    for c in range(10):
        assert torch.equal(memory[c], torch.stack([stored(k, c) for k in range(3)]).flatten(1))
    capped = curriculum.initial_memory(run, 3, cap=2)
    assert all(torch.equal(capped[c], memory[c][1:]) for c in range(10))  # the newest two
    score = Learnability(make_student("convnet", SPEC, seed=1), SPEC, make_student("convnet", SPEC, seed=2),
                         reference_view(SPEC), 0.5)
    inc = Increment(SPEC, str(tmp_path / "more" / "images"), str(tmp_path / "more" / "latents"), None, range(3, 5))
    before = {c: m.clone() for c, m in memory.items()}
    curriculum.generate_increment(run, inc, prior, plan, SamplerConfig(cfg_scale=2.0, steps=6), score, GUIDE, memory)
    for c in range(10):
        added = torch.stack([inc.latent(c, 3), inc.latent(c, 4)]).flatten(1)  # in slot order
        assert torch.equal(memory[c], torch.cat([before[c], added]))
