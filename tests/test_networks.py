"""The networks (model.py) and how students are trained (train_student.py): the prior loaded through from_pretrained,
the field's evaluation networks against their sources, the recipes, augmentation and CutMix, soft labels, theta*'s
and IGD's surrogate, and a user's weights in the field's formats."""
import math
import os

import pytest
import torch

import igd
import reference
import train_student as ts
from data import Augment, ImageSet, classifier_input, cutmix, get_spec, load_real, with_view
from ground.common import UserError
from model import ARCHS, ConvNet, load_prior, make_student
from reference import reference_view
from train_student import RECIPES, batch_size_for, epochs_for_ipc, make_optimizer, recipe_view, train_student


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
    view = recipe_view(get_spec("imagewoof"), recipe)
    image = torch.rand(3, 300, 451, generator=torch.Generator().manual_seed(0))
    reference = v2.Normalize(view.mean, view.std)(v2.CenterCrop(crop)(v2.Resize(resize, antialias=True)(image)))
    ours = classifier_input(image * 2 - 1, view)
    assert view.res == crop and ours.shape == reference.shape == (3, crop, crop)
    assert (ours - reference).abs().max() < 1e-4


def test_minimax_augmentation_is_seeded_and_device_side():
    spec = recipe_view(get_spec("imagewoof", res=32), "minimax")
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


def test_color_jitter_on_the_batch_is_minimax_per_image_loop():
    """The batched ColorJitter draws what a loop over images drew (one generator stream: an op order, then three
    alphas, image by image) and gives each image what Minimax's per-image loop gives it."""
    from data import _grey
    spec = recipe_view(get_spec("imagewoof", res=16), "minimax")
    x = torch.rand(7, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    batched = Augment(spec, "minimax", torch.Generator().manual_seed(5)).color_jitter(x.clone(), 0.4)
    g, looped = torch.Generator().manual_seed(5), x.clone()
    for i in range(len(looped)):
        for op in torch.randperm(3, generator=g).tolist():
            alpha = (torch.rand(1, generator=g) * 0.8 - 0.4).item()
            target = [torch.zeros_like(looped[i]), _grey(looped[i]).mean().expand_as(looped[i]),
                      _grey(looped[i]).expand_as(looped[i])][op]
            looped[i] = looped[i].lerp(target, alpha)
    assert not torch.allclose(looped, x, atol=1e-2)  # the jitter moved the images
    assert torch.allclose(batched, looped, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("res", [24, 56])  # the crops shrunk (antialiased), then enlarged
def test_random_resized_crop_on_the_batch_is_torchvision_per_image(res):
    """RandomResizedCrop's boxes are torchvision's get_params on the augmentation's generator (the stream a loop over
    images draws), and the batched resize of every box equals torchvision's antialiased resized_crop of it."""
    from torchvision.transforms.v2 import functional as TF
    spec = recipe_view(get_spec("imagewoof", res=res), "minimax")
    x = torch.rand(6, 3, 40, 36, generator=torch.Generator().manual_seed(0))
    crops = Augment(spec, "minimax", torch.Generator().manual_seed(7)).random_resized_crop(x, (0.5, 1.0))
    g, expected = torch.Generator().manual_seed(7), []
    low, high = math.log(3 / 4), math.log(4 / 3)
    for i in range(len(x)):
        while True:  # (every draw of this scale and these sizes succeeds within torchvision's 10 tries)
            area = 40 * 36 * (torch.rand(1, generator=g) * 0.5 + 0.5).item()
            aspect = math.exp((torch.rand(1, generator=g) * (high - low) + low).item())
            cw, ch = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
            if 0 < cw <= 36 and 0 < ch <= 40:
                top = int(torch.randint(0, 40 - ch + 1, (1,), generator=g))
                left = int(torch.randint(0, 36 - cw + 1, (1,), generator=g))
                break
        expected.append(TF.resized_crop(x[i], top, left, ch, cw, [res, res], antialias=True))
    assert crops.shape == (6, 3, res, res)
    assert torch.allclose(crops, torch.stack(expected), rtol=1e-5, atol=1e-6)


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
    assert batch_size_for(RECIPES["rded"], 50, 1000, 10**6) == 200 and batch_size_for(RECIPES["minimax"], 10, 10,
                                                                                      30) == 30
    assert [epochs_for_ipc(ipc) for ipc in (1, 10, 50, 100, 200)] == [3000, 2000, 1500, 1000, 1000]
    assert epochs_for_ipc(10, "rded") == 300


def test_prior_loads_through_from_pretrained(latent_prior):
    from diffusers import DiTTransformer2DModel
    prior = load_prior(latent_prior)
    reference = DiTTransformer2DModel.from_pretrained(latent_prior, subfolder="transformer")
    for (name, a), b in zip(prior.transformer.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert prior.vae is not None and prior.learned_variance
    assert prior.image_size == 16 and prior.null_label == 1000
    assert prior.scaling_factor == prior.vae.config.scaling_factor  # taken from the config, not 0.18215


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


def test_soft_label_recipe_learns_the_teachers_labels():
    """RDED recipe: targets are the teacher's softened predictions, not the hard labels."""
    from data import sample_real_ipc
    from ground.common import UserError

    class Always3(torch.nn.Module):  # a constructed teacher that calls every image a 3
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float() * 20.0
    spec = get_spec("digits")
    train = sample_real_ipc(load_real(spec, None, "train"), 5, seed=0)
    with pytest.raises(UserError, match="needs a teacher"):
        train_student(make_student("convnet", spec), train, spec, "rded", epochs=1)
    model = train_student(make_student("convnet", spec, seed=0), train, spec, "rded", epochs=15, teacher=Always3())
    with torch.no_grad():
        x = classifier_input(torch.stack([train.load(i) for i in range(len(train))]) * 2 - 1, spec)
        predicted = model(x).argmax(dim=1)
    assert (predicted == 3).float().mean() >= 0.9  # the teacher's label, not the 10 true classes


def test_a_distilled_set_is_decoded_once_not_every_epoch(monkeypatch, tmp_path):
    """Students train from uint8 images held in memory: 20 PNGs x 30 epochs read 20 files, not 600."""
    import data
    from ground.common import save_png
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


class Stop(Exception):
    pass


def test_igds_surrogate_is_convnet6_with_minimaxs_large_class_settings(monkeypatch, tmp_path):
    """DD_IGD's define_model builds ConvNet-6 whatever the evaluation network; MinimaxDiffusion `argument.py` trains
    ImageNet with more than 100 classes at lr 0.1, wd 1e-4, batch >= 128 (and everything smaller at 0.01 / 5e-4 /
    64)."""
    imagenet, woof = get_spec("imagenet"), get_spec("imagewoof")
    big = reference.surrogate_recipe(imagenet)
    assert (big["lr"], big["weight_decay"], big["batch_size"]) == (0.1, 1e-4, 128) and big["momentum"] == 0.9
    assert reference.surrogate_recipe(woof) == reference.SURROGATE
    assert (reference.SURROGATE["lr"], reference.SURROGATE["weight_decay"]) == (0.01, 5e-4)
    seen = {}

    def trajectory(view, arch, *args, **kwargs):
        seen["arch"] = arch
        raise Stop()
    surrogate_trajectory = reference.surrogate_trajectory
    monkeypatch.setattr(igd, "surrogate_trajectory", trajectory)
    with pytest.raises(Stop):
        igd.influence_score(imagenet, igd.IGD(igd.igd_guidance(), None), ts.Trainer())
    assert seen["arch"] == "convnet"

    def training(model, data, spec, recipe, *args, **kwargs):  # what surrogate_trajectory trains ImageNet-1K with
        seen["recipe"], seen["model"] = recipe, model
        raise Stop()
    monkeypatch.setattr(reference, "train_student", training)
    monkeypatch.setattr(reference, "load_real", lambda *a: ImageSet([], []))
    with pytest.raises(Stop):
        surrogate_trajectory(with_view(imagenet, res=32), "convnet", None, "cpu", 1, cache_dir=str(tmp_path))
    assert seen["recipe"] == big and isinstance(seen["model"], torch.nn.Module)


def test_digits_prior_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The prior's training is resumable: interrupted after a checkpoint, the rerun ends with the same EMA weights."""
    from train_prior import build_digits_prior
    small = dict(steps=6, lr=2e-3, ema_decay=0.995, batch_size=8, save_every=3)
    build_digits_prior(str(tmp_path / "straight"), small)

    calls, step = {"n": 0}, torch.optim.AdamW.step

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint at step 3
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        build_digits_prior(str(tmp_path / "resumed"), small)
    assert (tmp_path / "resumed.partial" / "dit_state.pt").exists()
    assert not (tmp_path / "resumed").exists()  # the prior appears only whole (renamed into place)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    build_digits_prior(str(tmp_path / "resumed"), small)
    a, b = load_prior(str(tmp_path / "straight")), load_prior(str(tmp_path / "resumed"))
    for (name, x), y in zip(a.transformer.state_dict().items(), b.transformer.state_dict().values()):
        assert torch.equal(x, y), name
    assert not (tmp_path / "resumed.partial").exists()  # the training state is gone once the prior is in place
    assert a.vae is None and a.image_size == 8 and not a.learned_variance  # pixel space, fixed variance


SPEC = get_spec("digits")


def test_igds_replay_buffer_is_a_reference_as_it_is(tmp_path):
    """IGD saves its surrogate as MTT-style replay buffers ([trajectory][epoch][parameters]): the last epoch of the
    first trajectory is theta*."""
    from reference import reference_model
    view = reference_view(SPEC)
    snapshots = [[p.detach().clone() for p in make_student("convnet", view, seed=s).parameters()] for s in range(3)]
    torch.save([snapshots, snapshots[:1]], tmp_path / "replay_buffer_0.pt")
    model, _ = reference_model(SPEC, "convnet", None, "cpu", path=str(tmp_path / "replay_buffer_0.pt"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), snapshots[-1]))
    torch.save({"state_dict": {f"module.{k}": v for k, v in make_student("convnet", view, seed=7).state_dict().items()},
                "epoch": 50}, tmp_path / "checkpoint.pth.tar")  # DD_IGD train.py's checkpoint, DataParallel names
    model, _ = reference_model(SPEC, "convnet", None, "cpu", path=str(tmp_path / "checkpoint.pth.tar"))
    expected = make_student("convnet", view, seed=7).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def minimax_names(state):
    """Our ConvNet's state dict under MinimaxDiffusion `train_models/convnet.py`'s names, in its order (a ModuleDict
    of lists: every conv first, then every norm), inside DD_IGD's checkpoint dict with DataParallel prefixes."""
    convs = {k.replace(f"features.{k.split('.')[1]}", f"layers.conv.{int(k.split('.')[1]) // 4}"): v
             for k, v in state.items() if k.startswith("features.") and int(k.split(".")[1]) % 4 == 0}
    norms = {k.replace(f"features.{k.split('.')[1]}", f"layers.norm.{int(k.split('.')[1]) // 4}"): v
             for k, v in state.items() if k.startswith("features.") and int(k.split(".")[1]) % 4 == 1}
    rest = {k: v for k, v in state.items() if not k.startswith("features.")}
    return {"state_dict": {f"module.{k}": v for k, v in {**convs, **norms, **rest}.items()}, "epoch": 50}


def test_minimaxs_key_layouts_are_read_and_a_misfit_names_what_it_expected(tmp_path):
    """Minimax's ConvNet names its tensors layers.conv.<d> / layers.norm.<d>; its ResNetAP-10 layer0.conv1 ...
    layer4.0.downsample.2, fc (the same tensors as ours, in the same order). Both load, with the same outputs."""
    from reference import reference_model
    view = reference_view(SPEC)
    theirs = make_student("convnet", view, seed=7)
    torch.save(minimax_names(theirs.state_dict()), tmp_path / "convnet.pth.tar")
    model, _ = reference_model(SPEC, "convnet", None, "cpu", path=str(tmp_path / "convnet.pth.tar"))
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(model(x), theirs.eval()(x))
    resnet = make_student("resnetap10", view, seed=3)
    renamed = {f"layer{n}.{k}": v for n, (k, v) in enumerate(resnet.state_dict().items())}  # other names, same order
    torch.save(renamed, tmp_path / "resnetap.pt")
    model, _ = reference_model(SPEC, "resnetap10", None, "cpu", path=str(tmp_path / "resnetap.pt"))
    assert torch.equal(model(x), resnet.eval()(x))
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"does not fit --arch convnet at 8 px: expected 10 tensors starting "
                                        r"features.0.weight \(128, 1, 3, 3\), found 1; the first difference: "
                                        r"expected features.0.weight \(128, 1, 3, 3\), found conv.weight \(3, 3\)"):
        reference_model(SPEC, "convnet", None, "cpu", path=str(tmp_path / "other.pt"))


@pytest.mark.slow
def test_the_mnist_prior_is_in_the_hub_layout_and_its_vae_round_trips(mnist_prior):
    """train_prior.py's latent tier, loaded by the very load_prior of DiT-XL/2: the DiT with the learned variance and
    the null label, the VAE whose scaling factor makes the train latents unit-variance."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    from data import load_mnist_split
    from guidance import decode_images
    prior = load_prior(mnist_prior)
    assert sorted(os.listdir(mnist_prior)) == ["scheduler", "transformer", "vae"]
    assert (prior.channels, prior.latent_size, prior.image_size) == (4, 8, 32) and prior.learned_variance
    assert prior.null_label == 10
    vae = AutoencoderKL.from_pretrained(os.path.join(mnist_prior, "vae"))
    assert prior.scaling_factor == vae.config.scaling_factor != 1.0
    x = torch.stack(load_mnist_split("test").items[:200])
    z = prior.encode(x * 2 - 1)  # the posterior mean, times the scaling factor
    assert z.shape == (200, 4, 8, 8) and 0.7 < float(z.std()) < 1.4  # unit-variance latents (fitted on the train split)
    with torch.no_grad():
        assert torch.equal(prior.decode(z), vae.decode(z / vae.config.scaling_factor).sample)
    assert F.mse_loss(decode_images(prior, z), x) < 0.5 * x.var()  # the round trip keeps the digit


def test_offline_the_resnet18_weights_are_named_with_where_they_go(monkeypatch):
    import urllib.error

    import reference

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(reference.torchvision.models, "resnet18", offline)
    with pytest.raises(UserError, match=r"download https://download.pytorch.org/models/resnet18-f37072fd.pth .* "
                                        r"copy it to .*checkpoints/resnet18-f37072fd.pth"):
        reference.pretrained_resnet18("cpu")


def test_offline_a_hub_prior_is_one_line_at_once_naming_the_flags_that_replace_it(monkeypatch):
    """No network: the hub's client would retry for half a minute; the hub is asked only when it answers, and the
    refusal names --prior, --vae and --data-dir (the local copies docs/gpu.md says how to make)."""
    import model
    from model import PriorFiles
    monkeypatch.setattr(model, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(PriorFiles) as refused:
        load_prior("facebook/DiT-XL-2-256")
    assert all(flag in str(refused.value) for flag in ("--prior DIR", "--vae DIR", "--data-dir DIR", "docs/gpu.md"))


def test_a_truncated_cached_resnet18_is_named_as_damaged(tmp_path, monkeypatch):
    """A torchvision download cut short leaves a file torch cannot read: one line naming it and the way out."""
    import reference
    monkeypatch.setattr(reference.torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"PK\x03\x04 cut short")
    monkeypatch.setattr(reference.torchvision.models.ResNet18_Weights.IMAGENET1K_V1, "get_state_dict",
                        lambda *a, **k: torch.load(tmp_path / "checkpoints" / "resnet18-f37072fd.pth"))
    with pytest.raises(UserError, match=r"resnet18-f37072fd.pth are damaged .* delete the file and rerun"):
        reference.pretrained_resnet18("cpu")
