"""Guidance that cannot be adversarial, as switches that are off by default (results.py `transfer`): S averaged
over K random training views (--guidance-views), the reference term averaged over several theta*
(--reference-archs), the student term over per-stage students of several architectures (--student-archs). With
K = 1 and one member each the run is today's, byte for byte."""
import pytest
import torch
import torch.nn.functional as F

from conftest import file_hashes, run_cli
from data import classifier_input, get_spec
from guidance import Learnability
from model import make_student
from train_student import SURROGATE, reference_spec, view_augment

SPEC = get_spec("digits")
REF = reference_spec(SPEC)  # theta*'s view: mean = std = 0.5


def nets(seed=0):
    torch.manual_seed(seed)
    return make_student("convnet", SPEC).eval(), make_student("convnet", REF).eval(), make_student("mlp", REF).eval()


def test_k_views_average_s_and_its_gradient_over_the_views():
    """With K known views (a fixed transform per view), S is the mean of the per-view S and its gradient the mean of
    the per-view gradients: the push follows what survives all K views."""
    student, reference, _ = nets()
    n, transforms = 4, [lambda x: torch.roll(x, 1, -1), lambda x: x * 0.8 + 0.1, lambda x: x.flip(-1)]

    def views(x):  # rows k*n .. (k+1)*n - 1 are view k of the n images
        return torch.cat([t(x[k * n:(k + 1) * n]) for k, t in enumerate(transforms)])
    averaged = Learnability(student, SPEC, reference, REF, 0.5, views=3, augments=[views, views])
    plain = Learnability(student, SPEC, reference, REF, 0.5)
    x = (torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1).requires_grad_(True)
    y = torch.tensor([0, 3, 5, 9])
    s = averaged(x, y)
    per_view = [plain(t(x * 0.5 + 0.5) * 2 - 1, y) for t in transforms]
    assert torch.allclose(s, torch.stack(per_view).mean(dim=0), rtol=1e-5, atol=1e-6)
    grad = torch.autograd.grad(s.sum(), x)[0]
    per_view_grads = [torch.autograd.grad(v.sum(), x)[0] for v in per_view]
    assert torch.allclose(grad, torch.stack(per_view_grads).mean(dim=0), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(grad, per_view_grads[0], rtol=1e-2)  # and not any single view's


@pytest.mark.parametrize("dataset,channels,res", [("digits", 1, 8), ("imagewoof", 3, 32)])
def test_training_views_are_random_seeded_and_differentiable(dataset, channels, res):
    """The views are the recipe's own augmentation (digits: the 1-pixel shift; Minimax: crop, flip, jitter,
    lighting), drawn from a seeded generator, and gradients flow through them."""
    from train_student import recipe_spec
    spec = recipe_spec(get_spec(dataset, res=res), "minimax")
    x = torch.rand(6, channels, res, res, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    draw = lambda seed: view_augment(spec, "minimax", torch.Generator().manual_seed(seed))(x)  # noqa: E731
    a, b, c = draw(1), draw(1), draw(2)
    assert a.shape == (6, channels, spec.res, spec.res) and torch.equal(a, b) and not torch.equal(a, c)
    grad = torch.autograd.grad(a.sum(), x)[0]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_the_reference_term_of_an_ensemble_is_the_mean_of_its_members():
    student, convnet, mlp = nets()
    x, y = torch.rand(5, 1, 8, 8) * 2 - 1, torch.tensor([1, 2, 3, 4, 5])
    parts = Learnability(student, SPEC, [convnet, mlp], [REF, REF], 0.5).parts(x, y)
    ce = lambda model: F.cross_entropy(model(classifier_input(x, REF)), y, reduction="none")  # noqa: E731
    assert torch.allclose(parts["reference_ce"], (ce(convnet) + ce(mlp)) / 2)
    assert torch.allclose(parts["S"], parts["student_ce"] - 0.5 * (ce(convnet) + ce(mlp)) / 2)
    one = Learnability(student, SPEC, [convnet], [REF], 0.5).parts(x, y)
    today = Learnability(student, SPEC, convnet, REF, 0.5).parts(x, y)
    assert all(torch.equal(one[k], today[k]) for k in today)  # one member is theta* itself, bit for bit
    # students too (--student-archs): the student term is the mean of the students' CE
    other = make_student("mlp", SPEC, seed=4).eval()
    both = Learnability([student, other], SPEC, convnet, REF, 0.5).parts(x, y)
    student_ce = lambda model: F.cross_entropy(model(classifier_input(x, SPEC)), y, reduction="none")  # noqa: E731
    assert torch.allclose(both["student_ce"], (student_ce(student) + student_ce(other)) / 2)
    assert torch.allclose(both["S"], both["student_ce"] - 0.5 * ce(convnet))
    assert all(torch.equal(Learnability([student], SPEC, convnet, REF, 0.5).parts(x, y)[k], today[k]) for k in today)


def test_one_view_and_one_member_are_todays_bytes_and_views_are_reproducible(tmp_path, pixel_prior):
    base = ["distill.py", "--dataset", "digits", "--prior", pixel_prior, "--ipc", 2, "--stage-ipc", 1, "--steps", 6,
            "--guide-from", 0, "--guide-until", 5, "--student-epochs", 2, "--reference-epochs", 2, "--no-eval"]
    runs = {"today": [], "explicit": ["--guidance-views", 1, "--reference-archs", "convnet"],
            "views": ["--guidance-views", 3], "views again": ["--guidance-views", 3],
            "ensemble": ["--reference-archs", "convnet,mlp"], "students": ["--student-archs", "convnet,mlp"]}
    hashes = {}
    for name, flags in runs.items():
        r = run_cli(*base, *flags, "--out-dir", tmp_path / name.replace(" ", "_"), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        hashes[name] = file_hashes(tmp_path / name.replace(" ", "_") / "distilled", ".png")
    assert len(hashes["today"]) == 20 and hashes["explicit"] == hashes["today"]
    assert hashes["views"] == hashes["views again"]  # seeded: the same views, the same images
    stage_1 = lambda h: {k: v for k, v in h.items() if k.endswith("00001.png")}  # noqa: E731 (the guided stage)
    assert stage_1(hashes["views"]) != stage_1(hashes["today"]) != stage_1(hashes["ensemble"])
    assert stage_1(hashes["students"]) != stage_1(hashes["today"])
    assert (tmp_path / "students" / "stage_1" / "student_mlp.pt").exists()  # each student saved, reloadable
    assert SURROGATE["augment"] == "minimax"  # theta*'s own augmentation is what its views are drawn from
