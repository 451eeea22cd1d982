"""
The first command to run on a GPU, before anything else there: `python -m tools.gpu_check` (one GPU, about 10
minutes). On random DiT-XL/2 + SD-VAE weights saved in the hub layout (loaded through --prior exactly as
facebook/DiT-XL-2-256 is) and a fake ImageWoof tree with the real layout, it runs, each ending in one PASS or FAIL
line with what broke:

  1. preflight     the full preflight of an ImageWoof run (labels, guidance direction, the batch that fits, every
                   step's price). Random weights fail its quality checks, as they should: PASS means it measured
                   everything and wrote preflight.json without crashing or running out of memory.
  2. resume        a two-slot LGD run (its stage 1 guided through the decoder), killed with SIGKILL in its guided
                   stage and resumed with the same command: PASS when the resume finishes and its set is the set of
                   an uninterrupted run (within one 8-bit level: CUDA recomputes in the last bits).
  3. bench         bench.py at XL in fp32, fp32 + TF32 and bf16, and the students' images/s (--student): each
                   runs (the speed-ups are in its output).
  4. mgd3          an MGD3 run: the train split through the VAE encoder into k-means modes, then the mode-pulled
                   sampler: PASS when the set is written.
  5. torchrun      with two GPUs or more, the run of 2 under `torchrun --nproc_per_node=2`.

`--size tiny --device cpu` runs the same checks on tiny shapes (the test suite does, so the checks themselves are
tested where no GPU is). Everything is written under --work (default out/gpu_check); the exit code is 1 if a
check failed.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from PIL import Image

from bench import SD_VAE, XL_DIT
from data import IMAGEWOOF
from ground.common import ArgumentParser, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)


def random_prior(folder, size):
    """Random weights of the real shapes (or tiny ones), saved as the hub's DiT-XL-2-256 folder is laid out."""
    torch.manual_seed(0)
    DiTTransformer2DModel(**(XL_DIT if size == "xl" else TINY_DIT)).save_pretrained(f"{folder}/transformer")
    AutoencoderKL(**(SD_VAE if size == "xl" else TINY_VAE)).save_pretrained(f"{folder}/vae")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range",
                  clip_sample=False).save_pretrained(f"{folder}/scheduler")
    return folder


def fake_imagewoof(root, side=64, train=8, val=4):
    """train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, a colour per class (so theta* has something to learn)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c, wnid in enumerate(IMAGEWOOF):
            os.makedirs(f"{root}/{split}/{wnid}", exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.array([25 * c, 255 - 25 * c, 128]) + rng.normal(0, 30, (side, side, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(f"{root}/{split}/{wnid}/{wnid}_{i}.JPEG")
    return root


def distill_args(prior, data, device):
    """A small ImageWoof LGD run: 2 images per class in 2 stages, a short schedule whose window holds guided steps."""
    return ["--dataset", "imagewoof", "--data-dir", data, "--prior", prior, "--device", device, "--seed-set", "dit",
            "--ipc", 2, "--stage-ipc", 1, "--steps", 10, "--guide-from", 2, "--guide-until", 8, "--res", 32,
            "--student-epochs", 2, "--reference-epochs", 2, "--no-eval"]


def run(argv, work, log, launcher=(sys.executable,), kill_when=None):
    """A command of the repository from `work`; kill_when(): SIGKILL it once true. Returns (exit code, last line)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    with open(log, "w") as out:
        proc = subprocess.Popen([*launcher, *map(str, argv)], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if kill_when is not None and kill_when():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return "killed", ""
            time.sleep(0.2)  # polling a child's progress: a tool's loop, not a test's
    lines = [line for line in open(log).read().splitlines() if line.strip()]
    return proc.returncode, (lines[-1] if lines else "")


def same_set(a, b, levels=1):
    """Two runs' distilled sets: the same files, each image within `levels` 8-bit levels."""
    names = lambda d: sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)
    if names(a) != names(b) or not names(a):
        return False
    load = lambda d, n: np.asarray(Image.open(os.path.join(d, n))).astype(np.int16)
    return all(np.abs(load(a, n) - load(b, n)).max() <= levels for n in names(a))


def check_preflight(ctx):
    folder = os.path.join(ctx.work, "preflight")
    argv = [os.path.join(REPO, "distill.py"), *distill_args(ctx.prior, ctx.data, ctx.device), "--preflight",
            "--out-dir", folder]
    code, last = run(argv, ctx.work, os.path.join(ctx.work, "preflight.log"))
    written = os.path.exists(os.path.join(folder, "preflight.json"))
    ok = written and (code == 0 or last.startswith("error: preflight:"))  # a verdict on random weights is fine
    return ok, f"preflight.json written; {last or 'passed'}" if ok else f"exit {code}: {last}"


def check_resume(ctx):
    straight, killed = os.path.join(ctx.work, "straight"), os.path.join(ctx.work, "killed")
    argv = [os.path.join(REPO, "distill.py"), *distill_args(ctx.prior, ctx.data, ctx.device), "--no-preflight"]
    code, last = run([*argv, "--out-dir", straight], ctx.work, os.path.join(ctx.work, "straight.log"))
    if code != 0:
        return False, f"the uninterrupted run: exit {code}: {last}"
    first = os.path.join(killed, "stage_1", "images", list(IMAGEWOOF)[0], "00001.png")
    code, _ = run([*argv, "--out-dir", killed], ctx.work, os.path.join(ctx.work, "killed.log"),
                  kill_when=lambda: os.path.exists(first))
    if code != "killed":
        return False, f"the run finished before its guided stage could be killed (exit {code})"
    code, last = run([*argv, "--out-dir", killed], ctx.work, os.path.join(ctx.work, "resumed.log"))
    if code != 0:
        return False, f"the resume: exit {code}: {last}"
    ok = same_set(os.path.join(straight, "distilled"), os.path.join(killed, "distilled"))
    return ok, "resumed to the uninterrupted set" if ok else "the resumed set differs from the uninterrupted one"


def check_bench(ctx):
    variants = [["--precision", "fp32", "--no-tf32"], ["--precision", "fp32", "--tf32"], ["--precision", "bf16"]]
    if ctx.device == "cpu":
        variants = variants[:1]  # TF32 and bf16 are CUDA's
    said = []
    for flags in variants:
        argv = [os.path.join(REPO, "bench.py"), "--size", ctx.size, "--device", ctx.device, "--batch-size", 1,
                "--repeats", 1, *flags]
        code, last = run(argv, ctx.work, os.path.join(ctx.work, f"bench_{'_'.join(flags[1:])}.log"))
        if code != 0:
            return False, f"bench {' '.join(flags)}: exit {code}: {last}"
        said.append(" ".join(flags))
    if ctx.device != "cpu":  # the students' images/s with the batched augmentation on the GPU (docs/cost.md)
        argv = [os.path.join(REPO, "bench.py"), "--student", "--device", ctx.device]
        code, last = run(argv, ctx.work, os.path.join(ctx.work, "bench_student.log"))
        if code != 0:
            return False, f"bench --student: exit {code}: {last}"
        said.append("--student")
    return True, f"ran {', '.join(said)} (see {ctx.work}/bench_*.log)"


def check_mgd3(ctx):
    argv = [os.path.join(REPO, "distill.py"), *distill_args(ctx.prior, ctx.data, ctx.device), "--method", "mgd3",
            "--set", "mode_stop=4", "--no-preflight", "--out-dir", os.path.join(ctx.work, "mgd3")]
    code, last = run(argv, ctx.work, os.path.join(ctx.work, "mgd3.log"))
    made = os.path.exists(os.path.join(ctx.work, "mgd3", "set.json"))
    return code == 0 and made, "modes computed, the set written" if code == 0 and made else f"exit {code}: {last}"


def check_torchrun(ctx):
    if ctx.device == "cpu" or torch.cuda.device_count() < 2:
        return None, "skipped: fewer than two GPUs"
    argv = [os.path.join(REPO, "distill.py"), *distill_args(ctx.prior, ctx.data, "cuda"), "--no-preflight", "--out-dir",
            os.path.join(ctx.work, "torchrun")]
    code, last = run(argv, ctx.work, os.path.join(ctx.work, "torchrun.log"),
                     launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"))
    return code == 0, "2 ranks finished the run" if code == 0 else f"exit {code}: {last}"


CHECKS = {"preflight": check_preflight, "resume": check_resume, "bench": check_bench, "mgd3": check_mgd3,
          "torchrun": check_torchrun}


def main(argv=None):
    p = ArgumentParser(prog="python -m tools.gpu_check", description="The first checks to run on a GPU machine.")
    p.add_argument("--size", default="xl", choices=["xl", "tiny"], help="DiT-XL/2 + SD VAE shapes, or tiny ones")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where the checks run")
    p.add_argument("--work", default="out/gpu_check", help="a folder for the weights, the data and the runs (made "
                   "afresh)")
    p.add_argument("--checks", nargs="+", default=list(CHECKS), choices=list(CHECKS), help="which checks to run")
    ctx = p.parse_args(argv)
    ctx.work = os.path.abspath(ctx.work)
    shutil.rmtree(ctx.work, ignore_errors=True)
    os.makedirs(ctx.work)
    started = time.time()
    ctx.prior = random_prior(os.path.join(ctx.work, "prior"), ctx.size)
    ctx.data = fake_imagewoof(os.path.join(ctx.work, "imagewoof"))
    failed = 0
    for name in ctx.checks:
        t = time.time()
        ok, said = CHECKS[name](ctx)
        verdict = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        failed += ok is False
        print(f"{verdict:<4} {name:<10} {time.time() - t:6.0f} s  {said}", flush=True)
    print(f"{len(ctx.checks) - failed} of {len(ctx.checks)} checks did not fail, in {time.time() - started:.0f} s; "
          f"logs in {ctx.work}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
