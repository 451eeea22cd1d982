"""
The first command on a GPU machine: `python -m tools.gpu_check` (one GPU; written to answer within 5 minutes on one
H100, `--full` adds an hour's worth). No download: random DiT-XL/2 + SD-VAE weights saved in the hub layout (loaded
through --prior exactly as facebook/DiT-XL-2-256 is) and a fake ImageWoof tree with the real layout, under --work.
It prints what it will check, one PASS / FAIL / SKIP line per check, and last one line to paste into an issue.

  env        tools/env.py: nvidia-smi's view, free GPU memory, /dev/shm, disk, the hub and its cache
  preflight  the preflight of an ImageWoof LGD run on the paper's pipeline (T_1 from IGD): labels, guidance
             direction, the batch that fits (IGD's double backward sized too), every step's price. Random weights
             fail its quality checks, as they should: PASS = it measured everything and wrote preflight.json
  run        a two-slot LGD run from IGD's seed in bf16, killed with SIGKILL in its guided stage, resumed (PASS: the
             resume finishes and every reader accepts its set.json), then evaluated (evaluate.py, one student)
  bench      a guided and an unguided XL step in fp32, TF32, bf16 and bf16 + channels-last (a run uses TF32, not
             channels-last: measured here), and the students' images/s
  torchrun   with two GPUs or more: the run under `torchrun --nproc_per_node=2`, its students BatchNorm ResNet-18s
             trained with DDP
  --full     also: an MGD3 run (the fake train split through the VAE encoder into k-means modes), and the run at
             the full 50 steps and the preset's sampler batch

`--size tiny --device cpu` runs the same checks on tiny shapes (the test suite does, so the checks themselves are
tested where no GPU is). The exit code is 1 if a check failed; the logs stay under --work.
"""
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from PIL import Image

import bench
from data import IMAGEWOOF
from ground.common import ArgumentParser, UserError, remove_path, run_cli, save_json
from ground.folder import run_folder_of
from tools.env import environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "gpu_check.json"  # a folder this tool made (it clears only such a folder)
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)


def random_prior(folder, size):
    """Random weights of the real shapes (or tiny ones), saved as the hub's DiT-XL-2-256 folder is laid out; kept
    between checks of one size (writing XL's 2.7 GB is most of a minute)."""
    if not os.path.isdir(os.path.join(folder, "scheduler")):
        torch.manual_seed(0)
        DiTTransformer2DModel(**(bench.XL_DIT if size == "xl" else TINY_DIT)).save_pretrained(f"{folder}/transformer")
        AutoencoderKL(**(bench.SD_VAE if size == "xl" else TINY_VAE)).save_pretrained(f"{folder}/vae")
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


def distill_args(ctx, steps=10):
    """A small ImageWoof LGD run on the paper's pipeline: 2 images per class in 2 stages, T_1 from IGD, a short
    schedule whose windows (LGD's and IGD's) hold guided steps, bf16 on a GPU."""
    return [os.path.join(REPO, "distill.py"), "--dataset", "imagewoof", "--data-dir", ctx.data, "--prior", ctx.prior,
            "--device", ctx.device, "--seed-set", "igd", "--ipc", 2, "--stage-ipc", 1, "--steps", steps,
            "--guide-from", 2, "--guide-until", steps - 2, "--set", "igd_from=2", "--set", f"igd_until={steps - 2}",
            "--res", 32, "--student-epochs", 2, "--reference-epochs", 2, "--no-eval",
            "--precision", "bf16" if ctx.device == "cuda" else "fp32"]


def run(argv, ctx, name, launcher=(sys.executable,), kill_when=None):
    """A command of the repository from the work folder, its output in <name>.log; kill_when(): SIGKILL it once true.
    Returns (exit code or "killed", the log's lines)."""
    log = os.path.join(ctx.work, f"{name}.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([*launcher, *map(str, argv)], cwd=ctx.work, env=dict(os.environ, PYTHONPATH=REPO),
                                stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if kill_when is not None and kill_when():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return "killed", []
            time.sleep(0.2)  # polling a child's progress: a tool's loop, not a test's
    return proc.returncode, [line for line in open(log).read().splitlines() if line.strip()]


def failure(code, lines):
    """The line a failed command ended on: its `error:` line, wherever a late warning put it."""
    errors = [line for line in lines if line.startswith("error:")]
    return f"exit {code}: {(errors or lines or [''])[-1]}"


def check_env(ctx):
    lines = environment(ctx.work)
    for status, line in lines:
        print(f"     {status:<4} {line}", flush=True)
    failed = [line for status, line in lines if status == "FAIL"]
    return not failed, "; ".join(failed) or f"{len(lines)} lines, none FAIL ({', '.join(s for s, _ in lines)})"


def check_preflight(ctx):
    folder = os.path.join(ctx.work, "preflight")
    code, lines = run([*distill_args(ctx), "--preflight", "--out-dir", folder], ctx, "preflight")
    path = os.path.join(folder, "preflight.json")
    verdict = [line for line in lines if line.startswith("error: preflight:")]  # a verdict on random weights is fine
    if not os.path.exists(path) or (code != 0 and not verdict):
        return False, failure(code, lines)
    result = json.load(open(path))
    step = result["measured"]["guided_step_s"]
    ctx.figures["preflight batch"] = result["sampler_batch"]
    ctx.figures["guided step s"] = round(step[max(step, key=int)], 4)
    return True, f"preflight.json written, sampler batch {result['sampler_batch']}; {(verdict or ['passed'])[-1]}"


def check_run(ctx, steps=10, batch=()):
    folder = os.path.join(ctx.work, "run")
    argv = [*distill_args(ctx, steps), *batch, "--no-preflight", "--out-dir", folder]
    first = os.path.join(folder, "stage_1", "images", list(IMAGEWOOF)[0], "00001.png")
    code, _ = run(argv, ctx, "killed", kill_when=lambda: os.path.exists(first))
    if code != "killed":
        return False, f"the run finished before its guided stage could be killed (exit {code})"
    code, lines = run(argv, ctx, "resumed")
    if code != 0:
        return False, f"the resume: {failure(code, lines)}"
    code, lines = run([os.path.join(REPO, "evaluate.py"), "--distilled", folder, "--runs", 1, "--epochs", 2,
                       "--device", ctx.device], ctx, "evaluate")
    if code != 0:
        return False, f"the evaluation: {failure(code, lines)}"
    ctx.figures["run acc"] = json.load(open(os.path.join(folder, "eval.json")))["acc_mean"]
    return True, "killed in its guided stage, resumed, its set.json read and evaluated"


def check_bench(ctx):
    variants = {"fp32": ("fp32", False, False), "tf32": ("fp32", True, False), "bf16": ("bf16", True, False),
                "bf16+nhwc": ("bf16", True, True)} if ctx.device == "cuda" else {"fp32": ("fp32", False, False)}
    device = torch.device(ctx.device)
    for name, (precision, tf32, nhwc) in variants.items():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        args = SimpleNamespace(size=ctx.size, precision=precision, repeats=2, channels_last=nhwc)
        rows = {r["variant"]: r for r in bench.bench_sampler(args, device, 2 if ctx.size == "xl" else 8)["rows"]}
        ctx.figures[f"{name} unguided s"] = round(rows["unguided"]["step_s"], 4)
        ctx.figures[f"{name} guided x"] = round(rows["guided"]["ratio"], 2)
    students = bench.bench_students(device)
    ctx.figures["student img/s"] = round(next(v for k, v in students.items() if k.startswith("224 px")), 1)
    return True, ", ".join(f"{k} {v}" for k, v in ctx.figures.items() if " unguided" in k or " guided" in k)


def check_mgd3(ctx):
    folder = os.path.join(ctx.work, "mgd3")
    code, lines = run([*distill_args(ctx), "--method", "mgd3", "--set", "mode_stop=4", "--no-preflight", "--out-dir",
                       folder], ctx, "mgd3")
    made = os.path.exists(os.path.join(folder, "set.json"))
    return code == 0 and made, "modes computed, the set written" if code == 0 and made else failure(code, lines)


def check_full_run(ctx):
    remove_path(os.path.join(ctx.work, "run"))
    return check_run(ctx, steps=50, batch=["--batch-size", 24])


def check_torchrun(ctx):
    if ctx.device == "cpu" or torch.cuda.device_count() < 2:
        return None, "skipped: fewer than two GPUs"
    folder = os.path.join(ctx.work, "torchrun")
    code, lines = run([*distill_args(ctx)[1:], "--arch", "resnet18_bn", "--reference-arch", "convnet",
                       "--no-preflight", "--out-dir", folder], ctx, "torchrun",
                      launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                os.path.join(REPO, "distill.py")))
    return code == 0, "2 ranks finished the run, DDP BatchNorm students" if code == 0 else failure(code, lines)


CHECKS = {"env": check_env, "preflight": check_preflight, "run": check_run, "bench": check_bench,
          "torchrun": check_torchrun}
FULL = {"mgd3": check_mgd3, "full-run": check_full_run}


def work_folder(path, size):
    """--work: a new or empty folder, or one this tool made (its marker), cleared but for the random prior of this
    size; never another folder (a run's, say)."""
    if os.path.isdir(path) and os.listdir(path) and not os.path.exists(os.path.join(path, MARK)):
        raise UserError(f"--work {path} is not a folder this check made (no {MARK}): give a new one")
    if run_folder_of(os.path.join(path, "x")) is not None:
        raise UserError(f"--work {path} is inside a run folder: give a new one")
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name != f"prior-{size}":
            remove_path(os.path.join(path, name))
    save_json(dict(size=size), os.path.join(path, MARK))
    return path


def main(argv=None):
    p = ArgumentParser(prog="python -m tools.gpu_check", description="The first checks to run on a GPU machine.")
    p.add_argument("--size", default="xl", choices=["xl", "tiny"], help="DiT-XL/2 + SD VAE shapes, or tiny ones")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where the checks run")
    p.add_argument("--work", default="out/gpu_check", help="its folder: the weights, the data, the runs, the logs")
    p.add_argument("--checks", nargs="+", default=None, choices=[*CHECKS, *FULL], help="which checks to run")
    p.add_argument("--full", action="store_true", help="also the MGD3 run and the run at 50 steps (an hour's worth)")
    ctx = p.parse_args(argv)
    if ctx.device == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA is not available on this machine: this checks a GPU; `python -m tools.gpu_check --size "
                        "tiny --device cpu` runs its checks on tiny shapes on the CPU")
    ctx.work = work_folder(os.path.abspath(ctx.work), ctx.size)
    names = ctx.checks or [*CHECKS, *(FULL if ctx.full else ())]
    print(f"gpu_check ({ctx.size} shapes on {ctx.device}) will check: {', '.join(names)}; logs in {ctx.work}",
          flush=True)
    started, ctx.figures, verdicts = time.time(), {}, {}
    ctx.prior = random_prior(os.path.join(ctx.work, f"prior-{ctx.size}"), ctx.size)
    ctx.data = fake_imagewoof(os.path.join(ctx.work, "imagewoof"))
    for name in names:
        t = time.time()
        ok, said = {**CHECKS, **FULL}[name](ctx)
        verdicts[name] = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        print(f"{verdicts[name]:<4} {name:<10} {time.time() - t:6.0f} s  {said}", flush=True)
    device = torch.cuda.get_device_name(0) if ctx.device == "cuda" else "cpu"
    failed = sum(v == "FAIL" for v in verdicts.values())
    print(f"gpu_check: {device}, torch {torch.__version__}, CUDA {torch.version.cuda}, {time.time() - started:.0f} s | "
          + " ".join(f"{k} {v}" for k, v in verdicts.items()) + " | "
          + ", ".join(f"{k} {v}" for k, v in ctx.figures.items()), flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
