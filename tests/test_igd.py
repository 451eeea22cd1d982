"""IGD's equations (igd.py): the influence score against a closed form and finite differences, the weight gradient
of its targets, and the adaptive checkpoint rule."""
import torch
import torch.nn.functional as F

from data import get_spec, with_view
from igd import Influence, select_checkpoints, weight_gradient

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
    assert torch.allclose(score.parts(x, y)["I"], torch.stack(expected), rtol=1e-10)


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
    grad = torch.autograd.grad(score.parts(x, y)["I"].sum(), x)[0]
    direction, h = torch.randn_like(x), 1e-6
    with torch.no_grad():
        fd = (score.parts(x + h * direction, y)["I"] - score.parts(x - h * direction, y)["I"]) / (2 * h)
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
