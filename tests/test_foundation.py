"""Foundation: prior loading, the unguided sampler vs DiT's own maths and diffusers, students, data, the dit CLI,
bad input."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from data import IMAGEWOOF, get_spec, load_real
from guidance import SamplerConfig, cfg_output, decode_images, sample
from model import ARCHS, load_prior, make_student


def generators(n, seed=0):
    return [torch.Generator().manual_seed(seed * 100 + i) for i in range(n)]


# ----------------------------------------------------------------------------- prior

def test_prior_loads_through_from_pretrained(latent_prior):
    from diffusers import DiTTransformer2DModel
    prior = load_prior(latent_prior)
    reference = DiTTransformer2DModel.from_pretrained(latent_prior, subfolder="transformer")
    for (name, a), b in zip(prior.transformer.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert prior.vae is not None and prior.learned_variance
    assert prior.image_size == 16 and prior.null_label == 1000
    assert prior.scaling_factor == prior.vae.config.scaling_factor  # taken from the config, not 0.18215


def test_ddpm_sampler_matches_manual_scheduler_loop(latent_prior):
    """Our sampler (guidance off) == stepping the diffusers DDPM scheduler by hand, learned variance and all."""
    prior = load_prior(latent_prior)
    labels = torch.tensor([3, 155, 999])
    ours = sample(prior, labels, generators(3), SamplerConfig(cfg_scale=4.0, steps=5))

    from diffusers.utils.torch_utils import randn_tensor
    scheduler, gens = prior.scheduler, generators(3)
    scheduler.set_timesteps(5)
    z = randn_tensor((3, 4, 8, 8), generator=gens)
    null = torch.full_like(labels, 1000)
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = prior.transformer(torch.cat([z, z]), timestep=t.expand(6), class_labels=torch.cat([labels, null])).sample
        cond, uncond = out.chunk(2)
        eps = uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4])
        z = scheduler.step(torch.cat([eps, cond[:, 4:]], 1), t, z, generator=gens).prev_sample
    assert (ours - z).norm() <= 1e-5 * z.norm()  # relative: these random-weight latents are large


def dit_respacing(num_timesteps=1000, steps=50):
    """DiT's `space_timesteps(1000, "50")`: evenly strided indices with a fractional stride, rounded."""
    stride = (num_timesteps - 1) / (steps - 1)
    return [round(i * stride) for i in range(steps)]  # 0, 20, 41, ..., 999


def test_sampler_step_equals_dit_learned_range_p_sample(latent_prior):
    """The project's 50-step sampler against DiT's own maths, re-derived here in float64 (DiT's
    `diffusion/respace.py` + `gaussian_diffusion.py:p_sample` with learn_sigma, clip_denoised=False):

      kept t_i (respacing), betas_i = 1 - abar(t_i) / abar(t_{i-1}), posterior variance and mean of q(x_{i-1}|x_i, x0),
      log var = frac * log(beta_i) + (1 - frac) * log(clipped posterior var), frac = (v + 1) / 2,
      x_{i-1} = mean + exp(log var / 2) * noise (no noise at i = 0).
    A wrong spacing ("leading"), a swapped variance or a clipped x0 breaks the equality.
    """
    prior = load_prior(latent_prior)
    prior.scheduler.set_timesteps(50)
    kept = dit_respacing()
    assert prior.scheduler.timesteps.tolist() == kept[::-1]

    abar_all = prior.scheduler.alphas_cumprod.double()
    abar = abar_all[kept]                                                   # (50,) respaced abar
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    betas = 1 - abar / abar_prev
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))    # DiT clips the first entry
    coef_x0, coef_xt = betas * abar_prev.sqrt() / (1 - abar), (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)

    labels, gens, c = torch.tensor([3, 155, 999]), generators(3), prior.channels
    sampler = SamplerConfig(cfg_scale=4.0, steps=50)
    ours = sample(prior, labels, gens, sampler)
    gens = generators(3)
    z = torch.cat([torch.randn((1, c, 8, 8), generator=g) for g in gens]).double()
    for i in reversed(range(50)):
        with torch.no_grad():
            out = cfg_output(prior, z.float(), torch.tensor(kept[i]), labels, sampler).double()
        eps, v = out[:, :c], out[:, c:]
        x0 = (z - (1 - abar[i]).sqrt() * eps) / abar[i].sqrt()
        mean = coef_x0[i] * x0 + coef_xt[i] * z
        frac = (v + 1) / 2
        log_var = frac * torch.log(betas[i]) + (1 - frac) * post_log_var[i]
        noise = torch.cat([torch.randn((1, c, 8, 8), generator=g) for g in gens]).double() if i > 0 else 0
        z = mean + (torch.exp(0.5 * log_var) * noise if i > 0 else 0)
    assert (ours.double() - z).norm() <= 1e-4 * z.norm()


def test_ddim_sampler_matches_diffusers_dit_pipeline(latent_prior):
    """With DDIM (deterministic), the images equal diffusers' DiTPipeline from the same initial noise."""
    from diffusers import DiTPipeline
    prior = load_prior(latent_prior, sampler="ddim")
    labels = [7, 500]
    ours = decode_images(prior, sample(prior, torch.tensor(labels), generators(2), SamplerConfig(cfg_scale=3.0, steps=6)))
    pipe = DiTPipeline(transformer=prior.transformer, vae=prior.vae, scheduler=prior.scheduler)
    theirs = pipe(labels, guidance_scale=3.0, generator=generators(2), num_inference_steps=6, output_type="np").images
    assert np.abs(ours.permute(0, 2, 3, 1).numpy() - theirs).max() < 1e-4


class FakeDiT(torch.nn.Module):
    """Returns 1 for every conditional output channel and 0 for the unconditional branch."""
    device = torch.device("cpu")  # as a diffusers model exposes it

    def __init__(self, null_label):
        super().__init__()
        self.null_label = null_label

    def forward(self, z, timestep, class_labels):
        cond = (class_labels != self.null_label).float().view(-1, 1, 1, 1)
        return type("Out", (), {"sample": cond.expand(-1, 8, *z.shape[2:]).clone()})


def test_cfg_is_applied_to_every_latent_channel(latent_prior):
    prior = load_prior(latent_prior)
    prior.transformer = FakeDiT(prior.null_label)
    z, t, labels = torch.zeros(2, 4, 8, 8), torch.tensor(500), torch.tensor([1, 2])
    out = cfg_output(prior, z, t, labels, SamplerConfig(cfg_scale=4.0))  # eps = 0 + 4 * (1 - 0) on each channel
    assert out.shape == (2, 8, 8, 8)
    assert torch.all(out[:, :4] == 4.0) and torch.all(out[:, 4:] == 1.0)  # variance from the cond branch
    quirk = cfg_output(prior, z, t, labels, SamplerConfig(cfg_scale=4.0, three_channels=True))
    assert torch.all(quirk[:, :3] == 4.0) and torch.all(quirk[:, 3] == 1.0)  # DiT's 3-of-4 channel variant


def test_same_seed_same_images_and_batch_size_independent(latent_prior):
    prior = load_prior(latent_prior)
    labels = torch.tensor([1, 2, 3, 4])
    four = SamplerConfig(steps=4)
    a = sample(prior, labels, generators(4), four)
    b = sample(prior, labels, generators(4), four)
    assert torch.equal(a, b)
    # image 2 alone, with its own generator, is the same image as in the batch of 4
    alone = sample(prior, labels[2:3], generators(4)[2:3], four)
    # equal up to float rounding, which depends on the batch and the CPU: compare relative to the magnitude
    # (these random-weight latents reach ~900, so an absolute tolerance would test one machine's rounding)
    assert (alone[0] - a[2]).norm() <= 1e-5 * a[2].norm()
    other_seed = sample(prior, labels, generators(4, seed=1), four)
    assert (other_seed - a).abs().mean() > 0.1


# ----------------------------------------------------------------------------- students & data

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dataset,res", [("digits", 8), ("imagewoof", 224), ("imagenette", 224), ("imagenet", 224)])
def test_student_output_shapes(arch, dataset, res):
    spec = get_spec(dataset)
    model = make_student(arch, spec).eval()
    with torch.no_grad():
        out = model(torch.randn(2, spec.channels, res, res))
    assert spec.res == res and out.shape == (2, spec.num_classes)


def test_convnet_depth_follows_resolution():
    from model import convnet_depth
    assert convnet_depth(224) == 6 and convnet_depth(256) == 6 and convnet_depth(8) == 2


def test_digits_split_and_reference_classifier(digits_reference):
    """Data path sanity: the fixed sklearn split, and theta* (a ConvNet trained on it, 10 epochs) reaches >= 95%."""
    from train_student import accuracy
    spec = get_spec("digits")
    train, test = load_real(spec, None, "train"), load_real(spec, None, "test")
    assert len(train) == 1437 and len(test) == 360
    assert train.items[0].shape == (1, 8, 8) and 0 <= float(train.items[0].min()) and float(train.items[0].max()) <= 1
    model, view, cache = digits_reference
    acc = accuracy(model, test, view)
    assert acc >= 0.95, acc
    assert view.mean == (0.5,) and view.std == (0.5,)  # IGD's surrogate view
    [cached] = list(cache.glob("surrogate_digits_convnet_res8_e10_*.pt"))  # cached for the next run
    assert len(torch.load(cached)) == 11  # the trajectory: the init and every one of the 10 epochs


# ----------------------------------------------------------------------------- the dit CLI

def test_distill_dit_on_fake_imagewoof_with_tiny_prior(tmp_path, latent_prior, fake_woof):
    out = tmp_path / "run"
    r = run_cli("distill.py", "--dataset", "imagewoof", "--method", "dit", "--no-preflight", "--ipc", 2, "--data-dir", fake_woof,
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
    assert not (tmp_path / "out" / "cache").exists() and not (out / "igd.json").exists()
    # a rerun skips the images already written (their bytes and times are unchanged)
    before = {p: os.stat(out / "distilled" / p).st_mtime_ns for p in ["n02086240/00000.png"]}
    r = run_cli("distill.py", "--dataset", "imagewoof", "--method", "dit", "--no-preflight", "--ipc", 2, "--data-dir", fake_woof,
                "--prior", latent_prior, "--steps", 3, "--batch-size", 8, "--out-dir", out, "--res", 16, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert before == {p: os.stat(out / "distilled" / p).st_mtime_ns for p in before}


def test_evaluate_cli_writes_eval_json(tmp_path, fake_woof):
    """--real-ipc baseline on the fake tree: eval.json with its documented keys, accuracies as fractions."""
    r = run_cli("evaluate.py", "--dataset", "imagewoof", "--data-dir", fake_woof, "--real-ipc", 2, "--runs", 2,
                "--epochs", 3, "--res", 16, "--out", tmp_path / "real", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "real" / "eval.json").read_text())
    for key in ("dataset", "method", "ipc", "arch", "runs", "accs", "acc_mean", "acc_std"):
        assert key in result
    assert result["ipc"] == 2 and result["runs"] == 2 and len(result["accs"]) == 2
    assert all(0 <= a <= 1 for a in result["accs"])
    assert abs(result["acc_mean"] - np.mean(result["accs"])) < 1e-9


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args,message", [
    (["--dataset", "cifar"], "unknown dataset"),
    (["--dataset", "imagewoof", "--data-dir", "/does/not/exist"], "does not exist"),
    (["--dataset", "imagenet"], "needs --data-dir"),
    (["--ipc", "0"], "--ipc must be positive"),
    (["--ipc", "-3", "--method", "dit"], "--ipc must be positive"),
    (["--ipc", "10", "--stage-ipc", "3"], "not a multiple"),
    (["--stage-ipc", "0"], "--stage-ipc must be positive"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    out = tmp_path / "never"
    r = run_cli("distill.py", *args, "--out-dir", out, cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not (tmp_path / "out").exists()  # nothing written


def test_malformed_tree_names_the_expected_layout(tmp_path):
    (tmp_path / "tree" / "train").mkdir(parents=True)
    r = run_cli("distill.py", "--dataset", "imagewoof", "--data-dir", tmp_path / "tree", "--method", "dit", cwd=tmp_path)
    assert r.returncode == 1 and "val" in r.stderr and "<wnid>" in r.stderr and "Traceback" not in r.stderr


def test_digits_prior_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The prior's training is resumable: interrupted after a checkpoint, the rerun ends with the same EMA weights."""
    from data import load_digits_split
    from train_prior import train_digits_prior
    train = load_digits_split("train")
    images, labels = torch.stack(train.items[:64]), train.labels[:64]
    small = dict(steps=6, batch_size=8, save_every=3)
    train_digits_prior(str(tmp_path / "straight"), images, labels, **small)

    calls, step = {"n": 0}, torch.optim.AdamW.step

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint at step 3
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_digits_prior(str(tmp_path / "resumed"), images, labels, **small)
    assert (tmp_path / "resumed.partial" / "train_state.pt").exists()
    assert not (tmp_path / "resumed").exists()  # the prior appears only whole (renamed into place)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train_digits_prior(str(tmp_path / "resumed"), images, labels, **small)
    a, b = load_prior(str(tmp_path / "straight")), load_prior(str(tmp_path / "resumed"))
    for (name, x), y in zip(a.transformer.state_dict().items(), b.transformer.state_dict().values()):
        assert torch.equal(x, y), name
    assert not (tmp_path / "resumed.partial").exists()  # the training state is gone once the prior is in place
    assert a.vae is None and a.image_size == 8 and not a.learned_variance  # pixel space, fixed variance


def test_soft_label_recipe_learns_the_teachers_labels():
    """RDED recipe: targets are the teacher's softened predictions, not the hard labels."""
    from common import UserError
    from data import sample_real_ipc
    from train_student import train_student

    class Always3(torch.nn.Module):  # a constructed teacher that calls every image a 3
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float() * 20.0
    spec = get_spec("digits")
    train = sample_real_ipc(load_real(spec, None, "train"), 5, seed=0)
    with pytest.raises(UserError, match="needs a teacher"):
        train_student(make_student("convnet", spec), train, spec, "rded", epochs=1)
    model = train_student(make_student("convnet", spec, seed=0), train, spec, "rded", epochs=15, teacher=Always3())
    from data import test_transform
    with torch.no_grad():
        x = torch.stack([test_transform(spec)(train.load(i)) for i in range(len(train))])
        predicted = model(x).argmax(dim=1)
    assert (predicted == 3).float().mean() >= 0.9  # the teacher's label, not the 10 true classes


def test_partial_imagenet_tree_is_refused(tmp_path):
    """ImageNet-1K labels are positions among the 1000 sorted wnids: a partial tree would mislabel every class."""
    for split in ("train", "val"):
        (tmp_path / "inet" / split / "n01440764").mkdir(parents=True)
    r = run_cli("distill.py", "--dataset", "imagenet", "--data-dir", tmp_path / "inet", "--method", "dit", cwd=tmp_path)
    assert r.returncode == 1 and "1000 ILSVRC-2012 class folders" in r.stderr and "found 1" in r.stderr
