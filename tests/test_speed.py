"""Speed levers that must not change the method: the cheap gradient decoder (TAESD) and its fidelity check,
torch.compile, no autograd graph where none is needed, students fed from memory, the benchmark script."""
import json
import shutil

import pytest
import torch

from conftest import run_cli
from data import get_spec
from guidance import GuidanceConfig, Learnability, SamplerConfig, SamplerLog, guided_output, sample
from model import load_prior, make_student

WOOF = get_spec("imagewoof", res=16)


def tiny_taesd(path):
    """A random AutoencoderTiny with TAESD's interface (4 latent channels, 8x upsampling: 8 -> 16 px needs 2 x 2)."""
    from diffusers import AutoencoderTiny
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(path)
    return str(path)


def woof_score(seed=0):
    torch.manual_seed(seed)
    return Learnability(make_student("convnet", WOOF), WOOF, make_student("convnet", WOOF), WOOF, 0.5)


def test_taesd_decodes_the_dits_latents_as_they_are_into_minus_one_one(tmp_path, latent_prior):
    """TAESD's scaling factor is 1.0 (it takes the DiT's latents as they are; the SD VAE divides them by its
    factor) and diffusers' wrapper maps the decoder's [0, 1] to [-1, 1] like AutoencoderKL: checked against the
    decoder's own layers, not against either sentence."""
    prior = load_prior(latent_prior, grad_decoder=tiny_taesd(tmp_path / "taesd"))
    assert prior.grad_vae is not None and prior.grad_vae.config.scaling_factor == 1.0
    z = torch.randn(2, 4, 8, 8) * 3
    decoder = prior.grad_vae.decoder
    with torch.no_grad():
        expected = decoder.layers(torch.tanh(z / 3) * 3) * 2 - 1  # DecoderTiny: clamp, layers in [0, 1] -> [-1, 1]
        assert torch.allclose(prior.decode_for_gradient(z), expected, atol=1e-6)
        assert prior.decode_for_gradient(z).shape == prior.decode(z).shape == (2, 3, 16, 16)
    assert not torch.allclose(prior.decode_for_gradient(z), prior.decode(z))  # the final images keep the VAE


def test_the_exact_path_is_the_gradient_through_the_vae(latent_prior):
    """--grad-decoder vae: g = grad_{z_t} S(VAE.decode(z0_hat / scaling)), re-derived here independently."""
    prior = load_prior(latent_prior)
    prior.scheduler.set_timesteps(10)
    score, sampler = woof_score(), SamplerConfig(cfg_scale=4.0)
    z, labels, classes, t = torch.randn(2, 4, 8, 8), torch.tensor([155, 159]), torch.tensor([0, 1]), prior.scheduler.timesteps[4]
    out, push, _ = guided_output(prior, z, t, labels, classes, sampler, score, GuidanceConfig(scale=1.0))
    z_in = z.clone().requires_grad_(True)
    null = torch.full_like(labels, 1000)
    both = prior.transformer(torch.cat([z_in, z_in]), timestep=t.expand(4), class_labels=torch.cat([labels, null])).sample
    eps = both[2:, :4] + 4.0 * (both[:2, :4] - both[2:, :4])
    abar = prior.scheduler.alphas_cumprod[t]
    x0 = prior.vae.decode((z_in - (1 - abar).sqrt() * eps) / abar.sqrt() / prior.vae.config.scaling_factor).sample
    g = torch.autograd.grad(score(x0, classes).sum(), z_in)[0]
    rho = 0.0015 * (1 - abar).sqrt() * eps.detach().flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1)
    assert torch.allclose(push, rho.view(-1, 1, 1, 1) * g, rtol=1e-4, atol=1e-9)


def test_taesd_guides_and_its_fidelity_is_logged(tmp_path, latent_prior, fake_woof):
    """On the tiny stand-ins: guided samples differ from the exact path's, and each guided stage's done.json
    holds the cosine of the cheap gradient to the exact one over its first guided batch."""
    prior = load_prior(latent_prior, grad_decoder=tiny_taesd(tmp_path / "taesd"))
    labels, classes = torch.tensor([155, 159, 162]), torch.tensor([0, 1, 2])
    guide = GuidanceConfig(scale=50.0, deviation=0.0, candidates=1, guide_from=0, guide_until=3)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    sampler, score, log = SamplerConfig(cfg_scale=4.0, steps=4), woof_score(), SamplerLog()
    cheap = sample(prior, labels, gens(), sampler, score, classes, None, guide, log)
    assert sorted(log.gradient_cosine) == [0, 1, 2, 3] and all(len(v) == 3 for v in log.gradient_cosine.values())
    assert all(-1 <= c <= 1 for v in log.gradient_cosine.values() for c in v) and not log.check_gradient
    sample(prior, labels, gens(), sampler, score, classes, None, guide, log)
    assert all(len(v) == 3 for v in log.gradient_cosine.values())  # checked once: the first guided batch only
    prior.grad_vae = None
    assert not torch.allclose(cheap, sample(prior, labels, gens(), sampler, score, classes, None, guide))

    r = run_cli("distill.py", "--dataset", "imagewoof", "--no-preflight", "--data-dir", fake_woof, "--prior", latent_prior, "--ipc", 2,
                "--seed-set", "dit",
                "--stage-ipc", 1, "--steps", 4, "--guide-from", 0, "--guide-until", 3, "--student-epochs", 1,
                "--reference-epochs", 1, "--res", 16, "--grad-decoder", tmp_path / "taesd", "--out-dir", tmp_path / "r",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    done = json.loads((tmp_path / "r" / "stage_1" / "done.json").read_text())
    assert -1 <= done["grad_decoder_cosine"] <= 1
    assert json.loads((tmp_path / "r" / "stage_0" / "done.json").read_text())["grad_decoder_cosine"] is None
    assert "cheap gradient decoder vs exact, cosine" in r.stdout


def test_no_graph_outside_the_window_and_no_weight_gradients(pixel_prior):
    """The guided code is the only place with autograd on, and it never touches a weight gradient: after a
    guided run every DiT and classifier parameter is frozen with no .grad, and DiT calls outside the window
    run without a graph."""
    prior = load_prior(pixel_prior)
    spec = get_spec("digits")
    torch.manual_seed(0)
    student, reference = make_student("convnet", spec), make_student("convnet", spec)
    score = Learnability(student, spec, reference, spec, 0.5)
    with_grad, forward = [], prior.transformer.forward

    def recording(z, timestep, class_labels):
        with_grad.append(torch.is_grad_enabled())
        return forward(z, timestep=timestep, class_labels=class_labels)
    prior.transformer.forward = recording
    labels = torch.arange(3)
    guide = GuidanceConfig(scale=30.0, deviation=1.0, candidates=1, guide_from=2, guide_until=4)
    sample(prior, labels, [torch.Generator().manual_seed(i) for i in range(3)], SamplerConfig(cfg_scale=2.0, steps=8),
           score, labels, [torch.randn(2, 64)] * 3, guide)
    prior.transformer.forward = forward
    assert with_grad == [False] * 3 + [True] * 3 + [False] * 2  # steps i = 7..0: the window 2..4 only
    for model in (prior.transformer, student, reference):
        assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_a_distilled_set_is_decoded_once_not_every_epoch(monkeypatch, tmp_path):
    """Students train from uint8 images held in memory: 20 PNGs x 30 epochs read 20 files, not 600."""
    import data
    from common import save_png
    from train_student import train_student
    spec = get_spec("digits")
    paths = []
    for i in range(20):
        paths.append(str(tmp_path / f"{i}.png"))
        save_png(torch.rand(1, 8, 8), paths[-1])
    reads, load = [], data.load_image
    monkeypatch.setattr(data, "load_image", lambda *a, **k: reads.append(1) or load(*a, **k))
    train_student(make_student("convnet", spec, seed=0), data.ImageSet(paths, [i % 10 for i in range(20)], channels=1),
                  spec, "minimax", 30)
    assert len(reads) == 20


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile's CPU backend needs a C compiler; none on this machine")
def test_compiled_prior_samples_the_same_images(pixel_prior):
    """--compile: the DiT compiled (inductor, CPU here) gives the same guided samples up to float rounding."""
    prior = load_prior(pixel_prior)
    spec = get_spec("digits")
    torch.manual_seed(0)
    score = Learnability(make_student("convnet", spec), spec, make_student("convnet", spec), spec, 0.5)
    labels, sampler = torch.arange(4), SamplerConfig(cfg_scale=2.0, steps=4)
    guide = GuidanceConfig(scale=30.0, deviation=0.0, candidates=1, guide_from=0, guide_until=3)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4)]  # noqa: E731
    eager = sample(prior, labels, gens(), sampler, score, labels, None, guide)
    prior.compile()
    compiled = sample(prior, labels, gens(), sampler, score, labels, None, guide)
    assert (compiled - eager).norm() <= 1e-4 * eager.norm()


def test_bench_tiny_reports_parts_flops_and_ratios(tmp_path):
    import bench
    result = bench.main(["--size", "tiny", "--batch-size", "4", "--repeats", "1", "--json", str(tmp_path / "b.json")])
    run = result["runs"][0]
    assert [r["variant"] for r in run["rows"]] == ["unguided", "guided", "guided-z0", "igd"]
    assert run["rows"][0]["ratio"] == 1.0 and all(r["step_s"] > 0 and r["gflops"] > 0 for r in run["rows"])
    parts = {c["part"]: c for c in run["components"]}
    # the guided step's FLOPs are at least the DiT forward + its input-backward + the classifiers'
    assert run["rows"][1]["gflops"] * 1e9 >= 0.99 * (parts["DiT CFG forward, with grad"]["flops"] +
                                                    parts["DiT input-backward"]["flops"])
    assert run["exact_parts_sum_s"] > 0 and json.loads((tmp_path / "b.json").read_text())["runs"][0]["batch"] == 4
