"""Scale and resilience: torchrun (gloo, 2 processes) vs 1 process, kill -9 and resume, corrupt data,
out-of-memory and NaN handling, bf16 autocast."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, file_hashes, make_fake_imagewoof, run_cli

ARGS = ["--dataset", "imagewoof", "--no-preflight", "--seed-set", "dit", "--ipc", 3, "--stage-ipc", 1, "--steps", 8, "--guide-from", 0, "--guide-until", 7,
        "--batch-size", 12, "--student-epochs", 3, "--res", 16]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, latent_prior, fake_woof):
    """One uninterrupted single-process lgd run: the reference every other run must reproduce."""
    cwd = tmp_path_factory.mktemp("straight")
    r = run_cli("distill.py", *ARGS, "--data-dir", fake_woof, "--prior", latent_prior, "--out-dir", cwd / "run", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return cwd / "run"


def torchrun(*args, cwd):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           os.path.join(REPO, "distill.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_two_gloo_processes_equal_one_process(tmp_path, straight_run, latent_prior, fake_woof):
    """Generation is sharded by global image index: the same bytes whatever the number of ranks.
    With --no-student-ddp every rank trains the identical per-stage student, so the whole set is
    byte-identical; with the default DDP student the seed stage is identical and the run completes
    (a DDP student sees other batches/augmentations, so later stages differ in their images)."""
    r = torchrun(*ARGS, "--data-dir", fake_woof, "--prior", latent_prior, "--out-dir", tmp_path / "nd",
                 "--no-student-ddp", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert file_hashes(tmp_path / "nd" / "distilled", ".png") == file_hashes(straight_run / "distilled", ".png")
    assert len(file_hashes(straight_run / "distilled", ".png")) == 30

    r = torchrun(*ARGS, "--data-dir", fake_woof, "--prior", latent_prior, "--out-dir", tmp_path / "ddp", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert file_hashes(tmp_path / "ddp" / "stage_0", ".png") == file_hashes(straight_run / "stage_0", ".png")
    assert len(file_hashes(tmp_path / "ddp" / "distilled", ".png")) == 30
    assert json.loads((tmp_path / "ddp" / "args.json").read_text())["world_size"] == 2


def test_kill_minus_nine_then_resume(tmp_path, straight_run, latent_prior, fake_woof):
    """A process killed mid-stage: the rerun finishes, finished files are untouched, and the final set is
    byte-identical to an uninterrupted run (memories are rebuilt from disk, students reloaded)."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "distill.py"), *map(str, ARGS), "--data-dir", fake_woof,
                             "--prior", latent_prior, "--out-dir", str(out)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "stage_1" / "student.pt").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid stage 1: its student is saved, its images are being generated
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "stage_2").exists() and (out / "stage_0" / "done.json").exists()
    stage0 = {p: os.stat(out / "stage_0" / p).st_mtime_ns for p in file_hashes(out / "stage_0", ".png")}

    r = run_cli("distill.py", *ARGS, "--data-dir", fake_woof, "--prior", latent_prior, "--out-dir", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert stage0 == {p: os.stat(out / "stage_0" / p).st_mtime_ns for p in stage0}  # not rewritten
    assert file_hashes(out / "distilled", ".png") == file_hashes(straight_run / "distilled", ".png")
    leftovers = [f for _, _, files in os.walk(out) for f in files if ".tmp" in f]
    assert not leftovers  # no half-written file survives a rerun's reads


def test_corrupt_image_in_data_dir_is_reported_by_path(tmp_path, latent_prior):
    woof = make_fake_imagewoof(str(tmp_path / "woof"), corrupt=True)
    r = run_cli("distill.py", *ARGS, "--data-dir", woof, "--prior", latent_prior, "--out-dir", tmp_path / "run",
                cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.JPEG" in lines[0] and "Traceback" not in r.stderr


def test_out_of_memory_becomes_a_batch_size_hint(capsys):
    from common import run_cli as cli

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    with pytest.raises(SystemExit) as exit_info:
        cli(oom)
    assert exit_info.value.code == 1
    assert "--batch-size" in capsys.readouterr().err


def test_non_finite_guidance_gradient_falls_back_to_the_unguided_step(pixel_prior):
    from guidance import GuidanceConfig, SamplerConfig, guided_output
    from model import load_prior
    prior = load_prior(pixel_prior)
    prior.scheduler.set_timesteps(10)
    t = prior.scheduler.timesteps[3]
    z, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])

    def score(x, y):  # sample 1 divides by zero: an infinite learnability and gradient
        return x.flatten(1).sum(dim=1) / torch.tensor([1.0, 0.0, 1.0])
    out, push, bad = guided_output(prior, z, t, labels, labels, SamplerConfig(cfg_scale=2.0), score,
                                   GuidanceConfig(scale=15.0))
    assert bad.tolist() == [False, True, False]  # per sample: only the one with the infinite S
    assert torch.all(push[1] == 0)  # the NaN sample takes the unguided step
    assert push[0].abs().sum() > 0 and torch.isfinite(push).all() and torch.isfinite(out).all()


def test_bf16_autocast_path_returns_float32_close_to_fp32(latent_prior):
    """--precision bf16 runs DiT, VAE and classifiers under autocast; the sampler and the guidance maths stay in float32.
    (Exercised on CPU autocast here; on CUDA distill.py turns it on.)"""
    from data import get_spec
    from guidance import GuidanceConfig, Learnability, SamplerConfig, guided_output
    from model import load_prior, make_student
    spec = get_spec("imagewoof", res=16)
    prior = load_prior(latent_prior)
    prior.scheduler.set_timesteps(10)
    torch.manual_seed(0)
    score = Learnability(make_student("convnet", spec), spec, make_student("convnet", spec), spec, 0.5)
    z, labels, classes = torch.randn(2, 4, 8, 8), torch.tensor([155, 159]), torch.tensor([0, 1])
    t, sampler = prior.scheduler.timesteps[4], SamplerConfig(cfg_scale=4.0)
    full = guided_output(prior, z, t, labels, classes, sampler, score, GuidanceConfig())[1]
    prior.autocast = True
    half = guided_output(prior, z, t, labels, classes, sampler, score, GuidanceConfig())[1]
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert not torch.equal(half, full)  # bf16 really ran
    # push = lambda rho_t g is a normalised gradient: bf16 may bend its direction a little, not more
    assert (F.cosine_similarity(half.flatten(1), full.flatten(1), dim=1) > 0.95).all()
    assert torch.allclose(half.flatten(1).norm(dim=1), full.flatten(1).norm(dim=1), rtol=0.05)
