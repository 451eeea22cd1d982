"""The field's evaluation networks and recipes, checked against the public code they are re-written from
(MinimaxDiffusion / IDC `train_models/`, `data.py:transform_imagenet`, `train.py`; RDED `validation/`)."""
import math

import pytest
import torch

from data import Augment, classifier_input, cutmix, get_spec, with_view
from model import ConvNet, make_student
from train_student import RECIPES, batch_size_for, epochs_for_ipc, make_optimizer, recipe_spec, train_student


def count(model):
    return sum(p.numel() for p in model.parameters())


# Counted by instantiating the source classes (Minimax `train_models/convnet.py` ConvNet(net_norm="instance",
# net_depth=6, net_width=128), `resnet_ap.py` ResNetAP("imagenet", 10, ..., norm_type="instance"), `resnet.py`
# ResNet("imagenet", 18, ..., norm_type="instance")) with 3 input channels.
SOURCE_COUNTS = [  # (arch, res, classes, parameters)
    ("convnet", 224, 10, 754_570), ("convnet", 256, 10, 763_530), ("convnet", 224, 1000, 1_896_040),
    ("resnetap10", 224, 10, 4_910_922), ("resnetap10", 256, 10, 4_910_922), ("resnetap10", 224, 1000, 5_418_792),
    ("resnet18", 224, 10, 11_181_642), ("resnet18", 224, 1000, 11_689_512), ("resnet18_bn", 224, 10, 11_181_642),
    ("resnet18", 128, 10, 11_173_962), ("resnet18", 64, 10, 11_173_962), ("resnetap10", 128, 10, 4_903_242),
]


@pytest.mark.parametrize("arch,res,classes,expected", SOURCE_COUNTS)
def test_parameter_counts_match_the_source_definitions(arch, res, classes, expected):
    spec = with_view(get_spec("imagenet", num_classes=classes), res=res)
    model = make_student(arch, spec)
    assert count(model) == expected
    with torch.no_grad():
        assert model(torch.randn(1, 3, res, res)).shape == (1, classes)


def test_network_shapes_match_the_sources():
    assert ConvNet(3, 10, 224).classifier.in_features == 128 * 3 * 3  # ConvNet-6 at 224 ends on 3 x 3
    assert ConvNet(3, 10, 256).classifier.in_features == 128 * 4 * 4
    spec = get_spec("imagewoof")
    resnetap = make_student("resnetap10", spec)
    with torch.no_grad():  # IDC's 'large' stem: 7x7 stride 1 + avgpool 4 (224 -> 56), no strided conv
        assert resnetap.stem(torch.randn(1, 3, 224, 224)).shape == (1, 64, 56, 56)
    assert isinstance(make_student("resnet18", spec).stem[1], torch.nn.GroupNorm)  # instance norm, not batch norm
    assert isinstance(make_student("resnet18_bn", spec).bn1, torch.nn.BatchNorm2d)


@pytest.mark.parametrize("arch,res,stem_out,pools", [
    ("resnet18", 224, 56, True), ("resnet18", 128, 64, True), ("resnet18", 100, 50, True), ("resnet18", 64, 64, False),
    ("resnetap10", 224, 56, True), ("resnetap10", 128, 64, True), ("resnetap10", 64, 64, False)])
def test_resnet_stems_by_input_size_as_idc(arch, res, stem_out, pools):
    """IDC / Minimax `IntroBlock`: 'small' (<= 64 px) no pooling, 'mid' (65..128) 3x3 conv + pool, 'large' 7x7 +
    pool. Without the mid pool a 128 px ResNet-18 carries 4x the activations: another network than the protocol's."""
    model = make_student(arch, with_view(get_spec("imagewoof"), res=res))
    with torch.no_grad():
        assert model.stem(torch.randn(1, 3, res, res)).shape == (1, 64, stem_out, stem_out)
        assert model(torch.randn(2, 3, res, res)).shape == (2, 10)
    assert any(isinstance(m, (torch.nn.MaxPool2d, torch.nn.AvgPool2d)) for m in model.stem) == pools


@pytest.mark.parametrize("recipe,resize,crop", [("minimax", 224, 224), ("igd", 256, 256), ("rded", 256, 224)])
def test_test_views_are_the_recipes_resize_and_centre_crop(recipe, resize, crop):
    """minimax: Resize(224) + CenterCrop(224) (Minimax `transform_imagenet(size=224)`); igd: its --size 256;
    rded: Resize(256) + CenterCrop(224). Checked against torchvision's transforms on a non-square image."""
    from torchvision.transforms import v2
    view = recipe_spec(get_spec("imagewoof"), recipe)
    image = torch.rand(3, 300, 451, generator=torch.Generator().manual_seed(0))
    reference = v2.Normalize(view.mean, view.std)(v2.CenterCrop(crop)(v2.Resize(resize, antialias=True)(image)))
    ours = classifier_input(image * 2 - 1, view)
    assert view.res == crop and ours.shape == reference.shape == (3, crop, crop)
    assert (ours - reference).abs().max() < 1e-4


def test_minimax_augmentation_is_seeded_and_device_side():
    spec = recipe_spec(get_spec("imagewoof", res=32), "minimax")
    x = (torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    a = Augment(spec, "minimax", torch.Generator().manual_seed(1))(x)
    b = Augment(spec, "minimax", torch.Generator().manual_seed(1))(x)
    c = Augment(spec, "minimax", torch.Generator().manual_seed(2))(x)
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Lighting adds eigvec @ (alpha * eigval) to every pixel: on a constant image the three channels stay flat
    flat = torch.full((4, 3, 32, 32), 128, dtype=torch.uint8)
    out = Augment(with_view(spec, mean=(0, 0, 0), std=(1, 1, 1)), "minimax", torch.Generator().manual_seed(3))(flat)
    assert (out - out.mean(dim=(2, 3), keepdim=True)).abs().max() < 1e-5


def test_cutmix_mixes_labels_by_the_pasted_area():
    x = torch.cat([torch.zeros(1, 1, 20, 20), torch.ones(1, 1, 20, 20)])
    y = torch.tensor([0, 1])
    for seed in range(5):
        mixed, target = cutmix(x, y, 2, torch.Generator().manual_seed(seed))
        assert torch.allclose(target.sum(dim=1), torch.ones(2))
        for i in range(2):  # the share of image i's pixels that came from the other image = the other label's weight
            from_other = (mixed[i] != x[i]).float().mean()
            assert torch.isclose(target[i, 1 - i], from_other, atol=1e-6)


def test_recipe_schedules_batches_and_epochs():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(4, 4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    # Minimax: x0.2 at epochs 2E/3 and 5E/6, stepped per epoch
    opt, schedule = make_optimizer(model, RECIPES["minimax"], 600)
    lrs = []
    for _ in range(600):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[399] == pytest.approx(0.01) and lrs[400] == pytest.approx(0.002) and lrs[500] == pytest.approx(0.0004)
    # RDED: 0.5 (1 + cos(pi e / 2E)) from 1x to ~0.5x, and weight decay on conv / linear weights only
    opt, schedule = make_optimizer(model, RECIPES["rded"], 300)
    for _ in range(299):
        opt.step()
        schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 299 / 600)))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert decayed == {id(model[0].weight), id(model[3].weight)} and opt.param_groups[1]["weight_decay"] == 0
    # RDED's batch grows with IPC (x2 for >= 100 classes); Minimax's epochs fall with it
    assert [batch_size_for(RECIPES["rded"], ipc, 10, 10**6) for ipc in (1, 10, 50)] == [10, 50, 100]
    assert batch_size_for(RECIPES["rded"], 50, 1000, 10**6) == 200 and batch_size_for(RECIPES["minimax"], 10, 10, 30) == 30
    assert [epochs_for_ipc(ipc) for ipc in (1, 10, 50, 100, 200)] == [3000, 2000, 1500, 1000, 1000]
    assert epochs_for_ipc(10, "rded") == 300


def test_the_best_column_is_taken_over_100_checkpoints():
    spec = get_spec("digits")
    from data import load_real, sample_real_ipc
    data = sample_real_ipc(load_real(spec, None, "train"), 1, 0)
    calls = []
    train_student(make_student("convnet", spec, seed=0), data, spec, "minimax", 200, on_eval=lambda m: calls.append(1))
    assert len(calls) == 100  # every 2 epochs, the last included (Minimax evaluates epochs / 100 apart)
