"""IGD (influence-guided diffusion, the paper's seed increment and main baseline): its score against a
hand-computed case and finite differences, its checkpoint rule, and its runs end to end."""
import json

import torch
import torch.nn.functional as F

from conftest import file_hashes, run_cli
from data import get_spec, with_view
from guidance import Influence, select_checkpoints, weight_gradient

IDENTITY = with_view(get_spec("digits"), mean=(0.0,), std=(1.0,))  # the classifier sees x * 0.5 + 0.5 as it is


def linear(weight):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    model[1].weight.data.copy_(weight)
    return model.double()


def test_influence_against_the_closed_form_of_a_linear_classifier():
    """For f(x) = W x, grad_W CE(f(x), y) = (softmax(W x) - e_y) x^T, so with two checkpoints W_1, W_2:
    I(x, y) = (cos(vec((p_1 - e_y) u^T), g_1) + cos(vec((p_2 - e_y) u^T), g_2)) / 2 - 1, u = x * 0.5 + 0.5."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(10, 64, generator=g, dtype=torch.float64) for _ in range(2)]
    targets = {(j, c): torch.randn(640, generator=g, dtype=torch.float64) for j in range(2) for c in range(10)}
    score = Influence([linear(w) for w in weights], IDENTITY, lambda j, c: targets[(j, c)])
    x = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 4, 9])
    expected = []
    for n in range(3):
        u = (x[n] * 0.5 + 0.5).flatten()
        cosines = []
        for j, w in enumerate(weights):
            p = torch.softmax(w @ u, dim=0)
            grad = torch.outer(p - F.one_hot(y[n], 10).double(), u).flatten()
            cosines.append(torch.dot(grad, targets[(j, int(y[n]))]) / grad.norm() / targets[(j, int(y[n]))].norm())
        expected.append(sum(cosines) / 2 - 1)
    assert torch.allclose(score(x, y), torch.stack(expected), rtol=1e-10)


def test_influence_gradient_against_finite_differences():
    """The double backward: dI/dx by autograd equals a central finite difference (float64, smooth net)."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 10)).double() for _ in range(2)]
    targets = {(j, c): torch.randn(sum(p.numel() for p in nets[0].parameters()), dtype=torch.float64)
               for j in range(2) for c in range(10)}
    score = Influence(nets, IDENTITY, lambda j, c: targets[(j, c)])
    x = (torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    y = torch.tensor([1, 7])
    grad = torch.autograd.grad(score(x, y).sum(), x)[0]
    direction, h = torch.randn_like(x), 1e-6
    with torch.no_grad():
        fd = (score(x + h * direction, y) - score(x - h * direction, y)) / (2 * h)
    assert torch.allclose(fd, (grad * direction).flatten(1).sum(dim=1), rtol=1e-5)


def test_weight_gradient_is_the_gradient_of_the_mean_loss_whatever_the_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).double()
    x, y = torch.randn(130, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (130,))
    full = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert torch.allclose(weight_gradient(model, x, y, batch=50), torch.cat([g.flatten() for g in full]))


def test_adaptive_checkpoint_rule_on_known_cosines():
    """IGD's rule: keep snapshot 0 (the random init), then each snapshot whose class-averaged cosine to the
    last kept one falls below 0.7 -- compared with the last kept, not with its predecessor."""
    cos = torch.eye(7)
    pairs = {(0, 1): 0.9, (0, 2): 0.75, (0, 3): 0.69, (3, 4): 0.95, (3, 5): 0.71, (3, 6): 0.3,
             (1, 2): 0.1, (4, 5): 0.2}  # low cosines to non-kept snapshots must not matter
    for (a, b), v in pairs.items():
        cos[a, b] = cos[b, a] = v
    assert select_checkpoints(cos, 0.7) == [0, 3, 6]
    assert select_checkpoints(cos, 0.8) == [0, 2, 3, 5, 6]  # unrelated snapshots (cosine 0) are all kept


def test_igd_and_the_papers_pipeline_end_to_end(tmp_path, latent_prior, fake_woof):
    """`--method igd` and `--method lgd --seed-set igd` on the tiny latent prior (VAE in the loop): IGD's
    chosen checkpoints are written, and stage 0 of the paper's pipeline is IGD's first increment, byte for byte."""
    common = ["--dataset", "imagewoof", "--no-preflight", "--data-dir", fake_woof, "--prior", latent_prior, "--res", 16, "--steps", 6,
              "--igd-from", 1, "--igd-until", 4, "--grad-ipc", 3, "--reference-epochs", 3, "--batch-size", 10]
    r = run_cli("distill.py", *common, "--method", "igd", "--ipc", 2, "--stage-ipc", 1, "--out-dir", tmp_path / "igd",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "igd" / "igd.json").read_text())
    assert info["checkpoints"][0] == 0 and info["trajectory_length"] == 4 and info["grad_ipc"] == 3
    assert len(file_hashes(tmp_path / "igd" / "distilled", ".png")) == 20 and (tmp_path / "igd" / "latents").is_dir()
    r = run_cli("distill.py", *common, "--seed-set", "igd", "--ipc", 2, "--stage-ipc", 1, "--guide-from", 1,
                "--guide-until", 4, "--student-epochs", 2, "--out-dir", tmp_path / "lgd", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    igd_first = {k: v for k, v in file_hashes(tmp_path / "igd" / "distilled", ".png").items() if k.endswith("00000.png")}
    assert file_hashes(tmp_path / "lgd" / "stage_0" / "images", ".png") == igd_first
    assert len(file_hashes(tmp_path / "lgd" / "distilled", ".png")) == 20
    # a hard-coded list, as IGD's released sampler uses, instead of the rule
    r = run_cli("distill.py", *common, "--method", "igd", "--ipc", 1, "--igd-checkpoints", "0,3",
                "--out-dir", tmp_path / "list", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "list" / "igd.json").read_text())["checkpoints"] == [0, 3]
    r = run_cli("distill.py", *common, "--method", "igd", "--ipc", 1, "--igd-checkpoints", "0,52",
                "--out-dir", tmp_path / "bad", cwd=tmp_path)  # IGD's released 1K list names a snapshot that does not exist
    assert r.returncode == 1 and "snapshots 0..3" in r.stderr.strip().splitlines()[-1]
