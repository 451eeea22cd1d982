"""Offline stand-ins built by the tests themselves: tiny random priors in diffusers format, a fake
ImageWoof tree with the real layout, and helpers to run the CLIs as a user would."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from data import IMAGEWOOF

# The peers' ImageWoof, copied from their code: MinimaxDiffusion and DD_IGD `misc/class_woof.txt` (wnids), MTT
# `utils.py` and DD-Ranking `utils/data.py` (`imagewoof = [193, 182, ...]`, ImageNet-1K indices); MTT's comment
# names them. The repo's table must be exactly this; a set made here must be labelled by it everywhere.
FIELD_WOOF = ["n02096294", "n02093754", "n02111889", "n02088364", "n02086240", "n02089973", "n02087394", "n02115641",
              "n02099601", "n02105641"]
FIELD_WOOF_IDS = [193, 182, 258, 162, 155, 167, 159, 273, 207, 229]


FIELD_WOOF_NAMES = ["Australian terrier", "Border terrier", "Samoyed", "beagle", "Shih-Tzu", "English foxhound",
                    "Rhodesian ridgeback", "dingo", "golden retriever", "Old English sheepdog"]


def pytest_collection_modifyitems(config, items):
    """diffusers' convention: a test marked @pytest.mark.slow (it trains a model, or what it tests is a process
    boundary: kill -9, torchrun, two processes racing) runs only with RUN_SLOW=1; the quick suite deselects it."""
    if os.environ.get("RUN_SLOW", "0").lower() in ("1", "yes", "true"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def make_tiny_latent_prior(path):
    """A random DiT (ImageNet's 1000 labels + null, learned variance) + a random 2-level VAE (16 px images)."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
    torch.manual_seed(0)
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                          sample_size=8, patch_size=2, num_embeds_ada_norm=1000).save_pretrained(f"{path}/transformer")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  sample_size=16).save_pretrained(f"{path}/vae")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range",
                  clip_sample=False).save_pretrained(f"{path}/scheduler")
    return path


def make_tiny_pixel_prior(path, num_classes=10):
    """A random pixel-space DiT shaped like the digits prior (1 channel, 8 px, fixed-small variance)."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel
    torch.manual_seed(1)
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=1,
                          sample_size=8, patch_size=2,
                          num_embeds_ada_norm=num_classes).save_pretrained(f"{path}/transformer")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                  clip_sample=True).save_pretrained(f"{path}/scheduler")
    return path


def make_fake_imagewoof(root, train_per_class=4, val_per_class=2, size=20, corrupt=False, wnids=None):
    """train/<wnid>/*.JPEG and val/<wnid>/*.JPEG with class-dependent colours (so classes are learnable); wnids: the
    class folders (default ImageWoof's)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(sorted(wnids or IMAGEWOOF)):
            os.makedirs(f"{root}/{split}/{wnid}", exist_ok=True)
            for i in range(n):
                base = np.array([25 * c, 255 - 25 * c, 128], dtype=np.float64)
                pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(f"{root}/{split}/{wnid}/{wnid}_{i}.JPEG")
    if corrupt:
        wnid = sorted(IMAGEWOOF)[0]
        with open(f"{root}/train/{wnid}/broken.JPEG", "wb") as f:
            f.write(b"this is not a jpeg")
    return root


class EmpiricalDiT(torch.nn.Module):
    """A stand-in DiT that is the exact denoiser of a small set of real images (no training needed).

    For x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps with x_0 drawn from the images of class y, the optimal
    prediction is x0_hat = sum_m w_m x_m with w = softmax(-||x_t - sqrt(abar) x_m||^2 / (2 (1 - abar))) over
    the class's images (all images for the CFG null label); eps = (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar).
    Its samples are real digits a trained classifier recognises, and x0_hat depends smoothly on x_t, so
    guidance gradients are meaningful: a cheap prior with known-good samples for tests.
    """

    def __init__(self, images, labels, alphas_cumprod, num_classes=10, scaled=False):
        super().__init__()
        # (M, D): images in [0, 1] are moved to [-1, 1]; scaled=True: the data is in the model's space already (latents)
        self.register_buffer("images", images.flatten(1) if scaled else images.flatten(1) * 2 - 1)
        self.register_buffer("labels", torch.as_tensor(labels))
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.shape = images.shape[1:]
        self.config = type("Config", (), dict(in_channels=images.shape[1], out_channels=images.shape[1],
                                               sample_size=images.shape[-1], num_embeds_ada_norm=num_classes))()

    @property
    def dtype(self):
        return self.images.dtype

    @property
    def device(self):
        return self.images.device

    def forward(self, z, timestep, class_labels):
        abar = self.alphas_cumprod[timestep.long()].view(-1, 1)
        flat = z.flatten(1)
        distance = ((flat[:, None, :] - abar.sqrt()[:, :, None] * self.images[None]) ** 2).sum(-1)  # (N, M)
        mask = (class_labels[:, None] == self.labels[None]) | (class_labels[:, None] == self.config.num_embeds_ada_norm)
        logits = (-distance / (2 * (1 - abar))).masked_fill(~mask, float("-inf"))
        x0 = torch.softmax(logits, dim=1) @ self.images
        eps = (flat - abar.sqrt() * x0) / (1 - abar).sqrt()
        return type("Out", (), {"sample": eps.view(len(z), *self.shape)})


def make_empirical_prior(per_class=20):
    """A Prior whose DiT is EmpiricalDiT over `per_class` real training digits per class."""
    from diffusers import DDPMScheduler

    from data import load_digits_split, sample_real_ipc
    from model import DIGITS_SCHEDULE, Prior, make_scheduler
    real = sample_real_ipc(load_digits_split("train"), per_class, seed=0)
    config = DDPMScheduler(**DIGITS_SCHEDULE).config
    scheduler = make_scheduler(config, "ddpm", pixel_space=True, learned_variance=False)
    return Prior(EmpiricalDiT(torch.stack(real.items), real.labels, scheduler.alphas_cumprod), scheduler)


# the latent tier's stand-in: trained (not random) but tiny, so its VAE round trip, its decoder gradient and a guided
# step through it are tested on learned weights in a few seconds; the real one trains in minutes (train_prior.py)
TINY_MNIST = dict(vae_steps=150, dit_steps=40, lr=2e-3, ema_decay=0.995)


@pytest.fixture(scope="session")
def mnist_prior(tmp_path_factory):
    """A trained tiny mnist prior in the hub layout (transformer/, vae/, scheduler/): train_prior.py's code."""
    from train_prior import build_mnist_prior
    path = str(tmp_path_factory.mktemp("mnist") / "mnist_prior")
    build_mnist_prior(path, TINY_MNIST)
    return path


def make_empirical_latent_prior(vae_dir, per_class=10, scale=1.0):
    """A latent Prior whose DiT is the exact denoiser of the (scaled) VAE latents of `per_class` real MNIST training
    images per class: its samples decode to (reconstructions of) real digits. scale: the VAE's config scaling factor
    is multiplied by it (a VAE loaded with the wrong scaling factor; the DiT's latents keep the right one)."""
    from diffusers import AutoencoderKL, DDPMScheduler

    from data import load_mnist_split, sample_real_ipc
    from model import MNIST_SCHEDULE, Prior, make_scheduler
    vae = AutoencoderKL.from_pretrained(vae_dir)
    real = sample_real_ipc(load_mnist_split("train"), per_class, seed=0)
    with torch.no_grad():
        latents = vae.encode(torch.stack(real.items) * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    vae.register_to_config(scaling_factor=vae.config.scaling_factor * scale)
    scheduler = make_scheduler(DDPMScheduler(**MNIST_SCHEDULE).config, "ddpm", learned_variance=False)
    return Prior(EmpiricalDiT(latents, real.labels, scheduler.alphas_cumprod, scaled=True), scheduler, vae)


@pytest.fixture(scope="session")
def digits_reference(tmp_path_factory):
    """theta* trained on the real digits (10 epochs, a few seconds), its view, and its cache folder."""
    from data import get_spec
    from reference import reference_model
    cache = tmp_path_factory.mktemp("reference_cache")
    model, view = reference_model(get_spec("digits"), "convnet", None, "cpu", epochs=10, cache_dir=str(cache))
    return model, view, cache


@pytest.fixture(scope="session")
def latent_prior(tmp_path_factory):
    return make_tiny_latent_prior(str(tmp_path_factory.mktemp("latent_prior")))


@pytest.fixture(scope="session")
def pixel_prior(tmp_path_factory):
    return make_tiny_pixel_prior(str(tmp_path_factory.mktemp("pixel_prior")))


@pytest.fixture(scope="session")
def fake_woof(tmp_path_factory):
    return make_fake_imagewoof(str(tmp_path_factory.mktemp("woof")))


def run_cli(script, *args, cwd, env=None, timeout=600):
    """Run a repo script as a user would (python script.py ...) from `cwd`; returns CompletedProcess."""
    full_env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def in_process(script, *args, cwd):
    """`python <script> args` from `cwd` as run_cli runs it, but inside this process (no interpreter to start, no
    torch to import again): the CLI's own main through ground.common.run_cli. Returns what run_cli returns."""
    import contextlib
    import importlib
    import io

    from ground.common import run_cli as run_main
    main = importlib.import_module(script[:-len(".py")]).main
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run_main(lambda: main([str(a) for a in args]))
                code = 0
            except SystemExit as e:
                code = e.code
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess([script, *map(str, args)], code, out.getvalue(), err.getvalue())


# A CLI run that signals itself at a moment fixed in advance (no polling race with a fast run): `target` is the
# function "module:attr" (or "module:Class.attr") whose call at which `when` (a Python expression over its
# positional args, `a`) holds sends `sig` to the process itself, just before the call does its work.
SIGNAL_AT = """
import functools, importlib, os, signal, sys
from ground.common import run_cli
module, attr = sys.argv[1].split(":")
owner = importlib.import_module(module)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
original, when, sig = getattr(owner, name), sys.argv[2], getattr(signal, sys.argv[3])
# Ctrl-C as a terminal delivers it, even when the suite itself runs in the background (a shell starts background
# jobs with SIGINT ignored, and a child inherits that)
signal.signal(signal.SIGINT, signal.default_int_handler)

@functools.wraps(original)
def signalled(*a, **kw):
    if eval(when):
        os.kill(os.getpid(), sig)
    return original(*a, **kw)
setattr(owner, name, signalled)
import distill
sys.argv = ["distill.py", *sys.argv[4:]]
run_cli(distill.main)
"""


def run_signalled(target, when, sig, *argv, cwd):
    """`python distill.py *argv` from `cwd`, signalled at target's call when `when` holds (see SIGNAL_AT)."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", SIGNAL_AT, target, when, sig, *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env=env)


def file_hashes(folder, suffix=""):
    """{relative path: sha256} of every file under folder whose name ends with suffix (byte-identity checks)."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            if f.endswith(suffix):
                path = os.path.join(root, f)
                with open(path, "rb") as handle:
                    out[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
    return out


def cli(main, argv, capsys, stdout=None):
    """Run a CLI main exactly as `python X.py` does (common.run_cli) in-process: (exit code, stderr lines).
    stdout: a list the captured standard output is appended to."""
    from ground.common import run_cli as run_main
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: main([str(a) for a in argv]))
        raise SystemExit(0)
    captured = capsys.readouterr()
    err = captured.err
    if stdout is not None:
        stdout.append(captured.out)
    assert "Traceback" not in err
    return exit_info.value.code, [line for line in err.splitlines() if line.strip()]


def one_error_line(code, lines, *fragments):
    """Exit 1 and exactly one `error:` line, the last one (a progress bar may precede it, on its own line)."""
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and lines[-1] == errors[0], lines
    assert not any("Error" in line for line in lines[:-1]), lines  # progress bars may precede it, no exception
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def tree(folder):
    """Every file under folder, relative, sorted."""
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, files in os.walk(folder) for f in files)

# a digits LGD run on a stand-in prior in seconds (2 stages of 1 IPC, a few steps, one-epoch students and theta*)
LGD = ["--dataset", "digits", "--ipc", 2, "--stage-ipc", 1, "--steps", 4, "--guide-from", 0, "--guide-until", 3,
       "--student-epochs", 1, "--reference-epochs", 1, "--no-eval"]


def digits_set(folder, ipc=2, classes=range(10)):
    """A bare <class>/<index>.png digits set of random images (every image different)."""
    from ground.common import save_png
    for n, c in enumerate(classes):
        for i in range(ipc):
            save_png(torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(10 * n + i)),
                     str(folder / str(c) / f"{i:05d}.png"))
    return folder


def dit_argv(prior, out, ipc=4):
    return ["--dataset", "digits", "--method", "dit", "--prior", prior, "--ipc", ipc, "--steps", 3, "--no-eval",
            "--out-dir", out]


@pytest.fixture(scope="session")
def dit_run(pixel_prior, tmp_path_factory):
    """A finished --method dit digits run (40 images), on the stand-in prior."""
    import distill
    out = tmp_path_factory.mktemp("dit") / "run"
    assert distill.main([str(a) for a in dit_argv(pixel_prior, out)]) is None
    return out
