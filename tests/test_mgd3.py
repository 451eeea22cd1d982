"""MGD3 (mgd3.py) on the shared sampler: its step is the paper's formula (DDPM and DDIM), lambda 0 is the unguided
sampler bit for bit, a pulled sample ends nearer its mode, the modes are k-means centroids computed the same way
every time, a killed MGD3 run resumes to the same bytes, and bad settings are one error line before any write."""
import os
import signal

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

import distill
from conftest import cli, file_hashes, in_process, make_empirical_prior, one_error_line, run_signalled
from data import get_spec, load_digits_split
from guidance import SamplerConfig, sample
from mgd3 import MGD3, ModePull
from model import load_prior, predicted_clean
from reference import real_modes


def hand_made(prior, step, seed=0):
    """z_t, a DiT output (eps, then a learned-variance channel block in [-1, 1] when the prior has one), modes."""
    g = torch.Generator().manual_seed(seed)
    c = prior.channels
    z, eps, modes = (torch.randn(3, c, 8, 8, generator=g) for _ in range(3))
    out = torch.cat([eps, torch.rand(3, c, 8, 8, generator=g) * 2 - 1], dim=1) if prior.learned_variance else eps
    prior.scheduler.set_timesteps(50)
    return z, out, modes, prior.scheduler.timesteps[step]


def test_the_ddpm_pull_is_the_formula_with_the_step_own_sigma(latent_prior):
    """z_{t-1} = mu - lambda sigma_t (z0_hat - m) + sigma_t noise: the pull is -lambda sigma_t (z0_hat - m), sigma_t
    the learned-range standard deviation computed here by hand, and the very one the scheduler's step draws with."""
    prior = load_prior(latent_prior)
    step = 10  # respaced index i = 39: inside the pulled steps (i > 25)
    z, out, modes, t = hand_made(prior, step)
    term = ModePull(modes, MGD3(scale=0.3, stop=25)).term(prior, t, z, out)
    abar = prior.scheduler.alphas_cumprod
    abar_t, abar_prev = abar[t], abar[prior.scheduler.timesteps[step + 1]]
    beta = 1 - abar_t / abar_prev
    posterior = (1 - abar_prev) / (1 - abar_t) * beta
    frac = (out[:, 4:] + 1) / 2  # DiT's variance output in [-1, 1] between log posterior and log beta (IDDPM)
    sigma = torch.exp(0.5 * (frac * torch.log(beta) + (1 - frac) * torch.log(posterior)))
    z0_hat = (z - (1 - abar_t).sqrt() * out[:, :4]) / abar_t.sqrt()
    assert torch.allclose(term, -0.3 * sigma * (z0_hat - modes), rtol=1e-5, atol=1e-7)
    # sigma_t is the standard deviation the step's noise is drawn with: two draws differ by sigma_t (n_a - n_b)
    draws = [[torch.Generator().manual_seed(s) for s in seeds] for seeds in ((1, 2, 3), (4, 5, 6))]
    a, b = (prior.step(out, t, z, g) for g in draws)
    noises = [randn_tensor(z.shape, generator=[torch.Generator().manual_seed(s) for s in seeds])
              for seeds in ((1, 2, 3), (4, 5, 6))]
    assert torch.allclose(a - b, prior.step_std(out, t) * (noises[0] - noises[1]), rtol=1e-4, atol=1e-6)


def test_in_pixel_space_the_pull_sees_the_clipped_prediction_the_step_uses(pixel_prior):
    """A pixel-space scheduler clips z0_hat to [-1, 1] inside its step (DiT's clip_denoised); the pull uses that
    z0_hat, not the unclipped one (1 / sqrt(abar_t) is 150 at the first step: an unclipped pull diverges)."""
    prior = load_prior(pixel_prior)
    z, out, modes, t = hand_made(prior, 0)
    abar_t = prior.scheduler.alphas_cumprod[t]
    z0_hat = predicted_clean(z, out, abar_t)
    assert z0_hat.abs().max() > 10  # the clip matters at this step
    abar_prev = prior.scheduler.alphas_cumprod[prior.scheduler.timesteps[1]]
    sigma = ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()  # the fixed (posterior) std
    term = ModePull(modes, MGD3(scale=0.3)).term(prior, t, z, out)
    assert torch.allclose(term, -0.3 * sigma * (z0_hat.clamp(-1, 1) - modes), rtol=1e-5, atol=1e-7)


def test_the_ddim_pull_uses_sqrt_one_minus_abar(latent_prior):
    prior = load_prior(latent_prior, sampler="ddim")
    z, out, modes, t = hand_made(prior, 5)
    term = ModePull(modes, MGD3(scale=0.2, stop=25)).term(prior, t, z, out)
    abar_t = prior.scheduler.alphas_cumprod[t]
    z0_hat = predicted_clean(z, out[:, :4], abar_t)
    assert torch.allclose(term, -0.2 * (1 - abar_t).sqrt() * (z0_hat - modes), rtol=1e-5, atol=1e-7)


def test_the_pull_acts_above_t_stop_only():
    pull = ModePull(torch.zeros(1), MGD3(stop=25))
    assert not pull.active(25) and pull.active(26)


def test_lambda_zero_is_the_unguided_sampler_bit_for_bit(latent_prior):
    prior = load_prior(latent_prior)
    labels, sampler = torch.tensor([1, 207, 999]), SamplerConfig(cfg_scale=4.0, steps=8)
    noise = lambda: [torch.Generator().manual_seed(s) for s in (3, 4, 5)]
    modes = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = sample(prior, labels, labels, noise(), sampler)
    zero = sample(prior, labels, labels, noise(), sampler, pull=ModePull(modes, MGD3(scale=0.0, stop=2)))
    pulled = sample(prior, labels, labels, noise(), sampler, pull=ModePull(modes, MGD3(scale=0.1, stop=2)))
    assert torch.equal(zero, plain) and not torch.allclose(pulled, plain)


def test_a_pulled_sample_ends_nearer_its_mode_than_its_unguided_twin():
    """The empirical digits prior (its samples are real training digits): each class's sample is tied to a mode, the
    class image farthest from where the unguided sample lands. From the same noise, at MGD3's constants (lambda 0.1,
    t_stop 25 of 50) no sample ends farther and the mean distance falls; at lambda 1 every sample ends nearer."""
    prior = make_empirical_prior(per_class=20)
    labels, sampler = torch.arange(10), SamplerConfig(cfg_scale=1.0, steps=50)
    noise = lambda: [torch.Generator().manual_seed(100 + c) for c in range(10)]
    plain = sample(prior, labels, labels, noise(), sampler)
    images = prior.transformer.images.view(-1, 1, 8, 8)
    members = [torch.nonzero(prior.transformer.labels == c).flatten() for c in range(10)]
    modes = torch.stack([images[m[((images[m] - plain[c]) ** 2).flatten(1).sum(1).argmax()]]
                         for c, m in enumerate(members)])
    far = (plain - modes).flatten(1).norm(dim=1)
    for scale, strictly in ((0.1, False), (1.0, True)):
        pulled = sample(prior, labels, labels, noise(), sampler, pull=ModePull(modes, MGD3(scale=scale)))
        near = (pulled - modes).flatten(1).norm(dim=1)
        assert (near <= far * (1 + 1e-5)).all() and near.mean() < far.mean(), (scale, near, far)
        assert not strictly or (near < 0.9 * far).all(), (scale, near, far)


def test_modes_are_kmeans_centroids_the_same_each_time_and_per_class(tmp_path, pixel_prior):
    """Digits in pixel space: k modes per class, each the mean of the class images nearest to it (a k-means fixed
    point), computed twice in two caches to the same bytes, and different for different classes."""
    prior, spec = load_prior(pixel_prior), get_spec("digits")
    first = real_modes(spec, prior, None, 3, flip=False, flag="--ipc", cache_dir=str(tmp_path / "a"))
    again = real_modes(spec, prior, None, 3, flip=False, flag="--ipc", cache_dir=str(tmp_path / "b"))
    assert sorted(first) == list(range(10)) and all(first[c].shape == (3, 1, 8, 8) for c in first)
    assert all(torch.equal(first[c], again[c]) for c in first)
    assert not torch.allclose(first[0], first[1], atol=1e-2)
    real = load_digits_split("train")
    x = torch.stack([real.load(i) for i, y in enumerate(real.labels) if y == 4]).flatten(1) * 2 - 1  # the encoder
    centroids = first[4].flatten(1)
    nearest = torch.cdist(x.double(), centroids.double()).argmin(dim=1)
    for j in range(3):
        assert torch.allclose(x[nearest == j].mean(dim=0), centroids[j], rtol=1e-4, atol=1e-5)


MGD3_ARGV = ["--dataset", "digits", "--method", "mgd3", "--ipc", 3, "--steps", 6, "--set", "mode_stop=1",
             "--batch-size", 4, "--no-eval"]


@pytest.mark.slow
def test_a_killed_mgd3_run_resumes_to_the_same_bytes(tmp_path, pixel_prior):
    straight = tmp_path / "straight"
    r = in_process("distill.py", *MGD3_ARGV, "--prior", pixel_prior, "--out-dir", straight, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "killed"
    r = run_signalled("ground.run:Increment.write", "a[2] == 1 and a[1] == 5", "SIGKILL", *MGD3_ARGV, "--prior",
                      pixel_prior, "--out-dir", out, cwd=tmp_path)
    assert r.returncode == -signal.SIGKILL
    assert 0 < len(file_hashes(out / "distilled", ".png")) < 30
    r = in_process("distill.py", *MGD3_ARGV, "--prior", pixel_prior, "--out-dir", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert file_hashes(out / "distilled", ".png") == file_hashes(straight / "distilled", ".png")
    assert len(file_hashes(out / "distilled", ".png")) == 30
    # LGD's T_1 from MGD3 is, image for image, the first image of each class of the MGD3 set of the same seed
    seeded = tmp_path / "seeded"
    r = in_process("distill.py", *MGD3_ARGV[:2], "--seed-set", "mgd3", "--ipc", 2, "--stage-ipc", 1, "--steps", 6,
                "--set", "mode_stop=1", "--batch-size", 4, "--student-epochs", 1, "--reference-epochs", 1,
                "--guide-from", 0, "--guide-until", 3, "--no-eval", "--prior", pixel_prior, "--out-dir", seeded,
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    one = tmp_path / "one"
    r = in_process("distill.py", *MGD3_ARGV[:4], "--ipc", 1, "--steps", 6, "--set", "mode_stop=1", "--batch-size", 4,
                "--no-eval", "--prior", pixel_prior, "--out-dir", one, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert file_hashes(seeded / "stage_0" / "images", ".png") == file_hashes(one / "distilled", ".png")


def test_bad_mgd3_settings_are_one_line_before_anything_is_written(tmp_path, pixel_prior, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    base = ["--dataset", "digits", "--method", "mgd3", "--prior", pixel_prior, "--no-eval", "--out-dir", out]
    for extra, fragment in ((["--ipc", 500], "lower --ipc to at most"),
                            (["--set", "mode_scale=-0.1"], "--set mode_scale must be a finite number >= 0"),
                            (["--set", "mode_stop=50"], "--set mode_stop=50 is outside the schedule"),
                            (["--set", "mode_stop=-1"], "t_stop must be in 0 .. 48")):
        code, lines = cli(distill.main, base + extra, capsys)
        one_error_line(code, lines, fragment)
        assert not os.path.exists(out) and not os.path.exists(tmp_path / "out")  # no run folder, no cache entry
    # LGD seeded by MGD3: its T_1's images per class are the modes it needs
    code, lines = cli(distill.main, base[:2] + ["--seed-set", "mgd3", "--stage-ipc", 200, "--ipc", 400] + base[4:],
                      capsys)
    one_error_line(code, lines, "lower --stage-ipc to at most")
    assert not os.path.exists(out)
