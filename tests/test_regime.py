"""tools.regime: what it measures of a set (on hand-made images), the margin it judges the regime by, and a candidate
prior that keeps the base prior's VAE and gradient decoder byte for byte and changes only the DiT."""
import json
import os

import pytest
import torch

from conftest import cli, file_hashes, one_error_line
from data import ImageSet
from tools import regime


class Constant(torch.nn.Module):
    """A 'theta*' that predicts class 3 whatever it sees."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float() + 0 * self.w


def test_statistics_are_the_distances_they_name():
    from data import get_spec
    from reference import reference_view
    g = torch.Generator().manual_seed(0)
    train_images = torch.rand(40, 1, 32, 32, generator=g)
    train_labels = torch.arange(10).repeat(4)
    train = ImageSet(list(train_images), train_labels.tolist())
    images = torch.cat([train_images[:10], torch.rand(10, 1, 32, 32, generator=g)])  # 10 real (in train), 10 new
    labels = torch.cat([train_labels[:10], train_labels[:10]])
    s = regime.statistics(images, labels, train, Constant(), reference_view(get_spec("mnist")))
    flat, real = images.flatten(1), train_images.flatten(1)
    d = torch.cdist(flat, real)
    d[d < 1e-6] = float("inf")  # the 10 images taken from train are not their own neighbours
    assert s["nearest"] == pytest.approx(float(d.min(1).values.mean()), rel=1e-5)
    assert float(d.min(1).values[:10].min()) > 0
    means = torch.stack([real[train_labels == c].mean(0) for c in range(10)])
    assert s["typicality"] == pytest.approx(float(torch.linalg.norm(flat - means[labels], dim=1).mean()), rel=1e-5)
    # two images a class: the within-class distance is the distance of the pair
    pair = torch.linalg.norm(flat[:10] - flat[10:], dim=1)
    assert s["diversity"] == pytest.approx(float(pair.mean()), rel=1e-5)
    assert s["recognised"] == pytest.approx(2 / 20)  # only the two images of class 3


def test_the_margin_is_the_worst_evaluator_against_random_real():
    real = {"mlp/minimax": [0.6, 0.7], "convnet/igd": [0.8], "logreg": [0.75]}
    row = {"mlp/minimax": [0.7, 0.7], "convnet/igd": [0.79], "logreg": [0.8]}
    m = regime.margins(row, real)
    assert m == pytest.approx({"mlp/minimax": 5.0, "convnet/igd": -1.0, "logreg": 5.0})
    assert min(m.values()) < 0  # one evaluator below real: not in the regime


def test_a_candidate_keeps_the_base_vae_and_changes_only_the_dit(mnist_prior, tmp_path, monkeypatch):
    from conftest import TINY_MNIST
    monkeypatch.setattr(regime, "ROOT", str(tmp_path))
    monkeypatch.setattr(regime, "MNIST_TRAINING", TINY_MNIST)
    monkeypatch.setitem(regime.CANDIDATES, "tiny", dict(dit=dict(num_layers=2), dit_steps=3))
    path = regime.candidate_prior("tiny", mnist_prior)
    for part in ("vae", "taesd"):
        assert file_hashes(os.path.join(path, part)) == file_hashes(os.path.join(mnist_prior, part))
    with open(os.path.join(path, "transformer", "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(mnist_prior, "transformer", "config.json")) as f:
        base = json.load(f)
    assert config["num_layers"] == 2 and base["num_layers"] != 2
    assert {k: v for k, v in config.items() if k not in ("num_layers", "_diffusers_version")} == \
        {k: v for k, v in base.items() if k not in ("num_layers", "_diffusers_version")}
    assert not os.path.exists(path + ".partial")  # it appears whole
    assert regime.candidate_prior("tiny", mnist_prior) == path  # cached: not trained again


def test_the_prior_check_compares_samples_with_random_real_by_logistic_regression():
    from data import get_spec, load_real, sample_real_ipc
    from train_prior import regime_check
    spec = get_spec("mnist")
    drawn = sample_real_ipc(load_real(spec, None, "train"), 10, 0)  # class-major, as the check's samples are
    real, same = regime_check(torch.stack(drawn.items), 10, spec)
    assert same == pytest.approx(real, abs=0.003)  # the same images: the same fit (to a test image or so)
    assert 0.6 < real < 0.95
    blank, blank_acc = regime_check(torch.zeros(10 * 12, 1, 32, 32), 12, spec)
    assert blank == real and blank_acc == pytest.approx(0.1)  # one prediction for all: 100 of 1,000 test images


@pytest.mark.parametrize("argv,said", [(["confirm"], "confirm needs --prior"),
                                       (["confirm", "--prior", "nope", "--cfg", "2"], "confirm needs --prior"),
                                       (["candidates", "--cfg", "0.5"], "--cfg must be a finite number >= 1")])
def test_bad_input_is_one_error_line_before_anything_is_made(argv, said, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may appear here: no prior trained, no out/regime
    code, lines = cli(regime.main, argv, capsys)
    one_error_line(code, lines, said)
    assert os.listdir(tmp_path) == []


def test_a_pixel_candidate_is_a_dit_on_the_pixels_with_its_raw_weights_kept(tmp_path, monkeypatch):
    from model import load_prior
    monkeypatch.setattr(regime, "ROOT", str(tmp_path))
    monkeypatch.setattr(regime, "PIXEL_DIT", dict(regime.PIXEL_DIT, num_layers=1))
    monkeypatch.setitem(regime.CANDIDATES, "tinypix", dict(pixel=True, dit_steps=3))
    path = regime.candidate_prior("tinypix", "no base: a pixel prior needs none")
    assert sorted(os.listdir(path)) == ["scheduler", "transformer", "transformer_raw"]  # no VAE, whole
    prior = load_prior(path)
    assert (prior.vae, prior.image_size, prior.image_channels) == (None, 32, 1)
    raw = regime.raw_weights(path)
    ema, trained = prior.transformer.state_dict(), raw.transformer.state_dict()
    moved = [k for k in ema if not torch.equal(ema[k], trained[k])]
    assert moved  # three steps of decay 0.995: the EMA lags the raw weights
    images, labels = regime.generated(raw, 2.0, 2, 0)
    assert images.shape == (100, 1, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1


def test_a_vae_candidate_trains_its_own_vae_and_no_gradient_decoder(tmp_path, monkeypatch):
    from conftest import TINY_MNIST
    from model import load_prior
    monkeypatch.setattr(regime, "ROOT", str(tmp_path))
    monkeypatch.setattr(regime, "MNIST_TRAINING", dict(TINY_MNIST, vae_steps=3))
    latent16 = regime.CANDIDATES["latent16"]
    monkeypatch.setitem(regime.CANDIDATES, "tinyvae", dict(latent16, dit=dict(latent16["dit"], num_layers=1),
                                                          dit_steps=3))
    path = regime.candidate_prior("tinyvae", "no base: it trains its own VAE")
    assert sorted(os.listdir(path)) == ["scheduler", "transformer", "transformer_raw", "vae"]  # whole, no taesd/
    prior = load_prior(path)
    assert (prior.channels, prior.latent_size, prior.image_size, prior.image_channels) == (4, 16, 32, 1)
    images, _ = regime.generated(prior, 2.0, 2, 0)
    assert images.shape == (100, 1, 32, 32)
