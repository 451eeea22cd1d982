"""The field's conventions in and out, each checked against the peers' own definitions: ImageWoof's class order,
exports that other evaluators (RDED, DD-Ranking) label right, IGD's unpadded file names, IGD's surrogate on
ImageNet-1K, and ResNet-18's stem by input size."""
import json
import os

import pytest
import torch
import torchvision

import curriculum
import distill
import evaluate
import train_student
from common import save_png
from conftest import cli, file_hashes, one_error_line, run_cli
from curriculum import seed_set_files
from data import ImageSet, class_table, get_spec, load_image, normalise, resize_crop, with_view
from export import class_folder

# The peers' ImageWoof, copied from their code: MinimaxDiffusion and DD_IGD `misc/class_woof.txt` (wnids), MTT
# `utils.py` and DD-Ranking `utils/data.py` (`imagewoof = [193, 182, ...]`, ImageNet-1K indices); MTT's comment
# names them. The repo's table must be exactly this; a set made here must be labelled by it everywhere.
FIELD_WOOF = ["n02096294", "n02093754", "n02111889", "n02088364", "n02086240", "n02089973", "n02087394", "n02115641",
              "n02099601", "n02105641"]
FIELD_WOOF_IDS = [193, 182, 258, 162, 155, 167, 159, 273, 207, 229]
FIELD_WOOF_NAMES = ["Australian terrier", "Border terrier", "Samoyed", "beagle", "Shih-Tzu", "English foxhound",
                    "Rhodesian ridgeback", "dingo", "golden retriever", "Old English sheepdog"]
FIELD_NETTE_IDS = [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]  # DD-Ranking / MTT `imagenette` (sorted wnids)


def test_class_index_is_the_fields():
    woof, nette = get_spec("imagewoof"), get_spec("imagenette")
    assert woof.wnids == FIELD_WOOF and woof.prior_labels == FIELD_WOOF_IDS
    assert [r["name"] for r in class_table(woof)] == FIELD_WOOF_NAMES  # prior label c is the dog of class c
    assert nette.wnids == sorted(nette.wnids) and nette.prior_labels == FIELD_NETTE_IDS


def test_dry_run_and_every_run_folder_list_the_classes(tmp_path, latent_prior, fake_woof, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = [dict(index=c, wnid=w, prior_label=i, name=n)
             for c, (w, i, n) in enumerate(zip(FIELD_WOOF, FIELD_WOOF_IDS, FIELD_WOOF_NAMES))]
    r = run_cli("distill.py", "--dataset", "imagewoof", "--dry-run", "--json", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["classes"] == table
    run = tmp_path / "run"
    argv = ["--dataset", "imagewoof", "--method", "dit", "--no-preflight", "--ipc", 1, "--steps", 2, "--data-dir",
            fake_woof, "--prior", latent_prior, "--res", 16, "--out-dir", run]
    assert cli(distill.main, argv, capsys)[0] == 0
    assert json.loads((run / "classes.json").read_text()) == table
    # a run folder whose classes are numbered otherwise (say, sorted) is refused by evaluate.py and by a resume
    (run / "classes.json").write_text(json.dumps([dict(r, index=c) for c, r in enumerate(
        sorted(table, key=lambda r: r["wnid"]))]))
    for main, flags in ((evaluate.main, ["--distilled", run, "--runs", 1]), (distill.main, argv)):
        one_error_line(*cli(main, flags, capsys), "numbers its classes differently", "class 0 is ('n02086240', 155)")
    os.remove(run / "classes.json")  # a folder from before classes.json: its stages number ImageWoof sorted
    one_error_line(*cli(distill.main, argv, capsys), "before lgd numbered this dataset in the field's class order")


def woof_set(folder, per_class=2):
    """A bare <wnid>/*.png set (IGD's unpadded names) whose every image is different."""
    for c, wnid in enumerate(FIELD_WOOF):
        for i in range(per_class):
            g = torch.Generator().manual_seed(100 * c + i)
            save_png(torch.rand(3, 16, 16, generator=g), str(folder / wnid / f"{i}.png"))
    return folder


@pytest.mark.parametrize("layout", ["rded", "ddranking"])
def test_exports_give_class_c_exactly_the_images_of_class_c(tmp_path, capsys, layout):
    """Read back with torchvision's ImageFolder (what DD-Ranking uses) and with RDED's rule (folder
    str(c).zfill(5) is class c): label c holds exactly the images of the field's class c. The source is untouched."""
    source = woof_set(tmp_path / "set")
    before = file_hashes(source)
    out = tmp_path / layout
    assert cli(evaluate.main, ["--export", source, "--dataset", "imagewoof", "--layout", layout, "--out", out],
               capsys)[0] == 0
    assert file_hashes(source) == before  # a copy: nothing moved, nothing written into the source
    if layout == "ddranking":  # the images at DD-Ranking's im_size (128), resized and cropped as its test split
        for path in before:
            save_png(resize_crop(load_image(str(source / path)), 128), str(tmp_path / "resized" / path))
        before = file_hashes(tmp_path / "resized")
        assert torchvision.datasets.ImageFolder(str(out))[0][0].size == (128, 128)
    hashes = file_hashes(out, ".png")
    folder = torchvision.datasets.ImageFolder(str(out))
    for c, wnid in enumerate(FIELD_WOOF):
        expected = sorted(h for p, h in before.items() if p.startswith(wnid + os.sep))
        labelled_c = sorted(hashes[os.path.relpath(p, out)] for p, y in folder.samples if y == c)
        assert labelled_c == expected and len(expected) == 2
        assert sorted(hashes[f"{str(c).zfill(5)}/{n}"] for n in os.listdir(out / str(c).zfill(5))) == expected
        assert class_folder(c) == str(c).zfill(5)
    if layout == "ddranking":  # its tensor API: what its test images look like, labels class-major
        images, labels = torch.load(out / "images.pt"), torch.load(out / "labels.pt")
        assert images.shape == (20, 3, 128, 128) and images.dtype == torch.float32
        assert labels.tolist() == [c for c in range(10) for _ in range(2)]
        view = with_view(get_spec("imagewoof"), res=128, crop_ratio=1.0)  # ImageNet mean / std
        x = load_image(str(source / FIELD_WOOF[3] / "1.png"))
        assert torch.allclose(images[7], normalise(resize_crop(x, 128)[None], view)[0], atol=1e-6)
    else:
        assert not (out / "images.pt").exists()
    info = json.loads((out / "export.json").read_text())
    assert info["layout"] == layout and [r["wnid"] for r in info["classes"]] == FIELD_WOOF
    # an export never writes over anything
    one_error_line(*cli(evaluate.main, ["--export", source, "--dataset", "imagewoof", "--layout", layout, "--out", out],
                        capsys), "is not an empty folder")


def test_a_seed_set_with_igds_unpadded_names_is_read_in_numeric_order(tmp_path):
    """IGD writes 0.png .. 99.png: at --stage-ipc 3 the seed is 0, 1, 2 (sorted names would give 0, 1, 10)."""
    spec = get_spec("digits")
    for c in range(10):
        for i in range(12):
            save_png(torch.full((1, 8, 8), i / 12), str(tmp_path / str(c) / f"{i}.png"))
    assert [os.path.basename(p) for p in seed_set_files(str(tmp_path), spec, 3)[4]] == ["0.png", "1.png", "2.png"]
    assert [os.path.basename(p) for p in seed_set_files(str(tmp_path), spec, 10)[0]] == [f"{i}.png" for i in range(10)]


class Stop(Exception):
    pass


def test_igds_surrogate_is_convnet6_with_minimaxs_large_class_settings(monkeypatch, tmp_path):
    """DD_IGD's define_model builds ConvNet-6 whatever the evaluation network; MinimaxDiffusion `argument.py` trains
    ImageNet with more than 100 classes at lr 0.1, wd 1e-4, batch >= 128 (and everything smaller at 0.01 / 5e-4 / 64)."""
    imagenet, woof = get_spec("imagenet"), get_spec("imagewoof")
    big = train_student.surrogate_recipe(imagenet)
    assert (big["lr"], big["weight_decay"], big["batch_size"]) == (0.1, 1e-4, 128) and big["momentum"] == 0.9
    assert train_student.surrogate_recipe(woof) == train_student.SURROGATE
    assert (train_student.SURROGATE["lr"], train_student.SURROGATE["weight_decay"]) == (0.01, 5e-4)
    seen = {}

    def trajectory(view, arch, *args, **kwargs):
        seen["arch"] = arch
        raise Stop()
    monkeypatch.setattr(curriculum, "surrogate_trajectory", trajectory)
    with pytest.raises(Stop):
        curriculum.influence_score(imagenet, None, "cpu", None)
    assert seen["arch"] == "convnet"

    def training(model, data, spec, recipe, *args, **kwargs):  # what surrogate_trajectory trains ImageNet-1K with
        seen["recipe"], seen["model"] = recipe, model
        raise Stop()
    monkeypatch.setattr(train_student, "train_student", training)
    monkeypatch.setattr(train_student, "load_real", lambda *a: ImageSet([], []))
    with pytest.raises(Stop):
        train_student.surrogate_trajectory(with_view(imagenet, res=32), "convnet", None, "cpu", 1,
                                           cache_dir=str(tmp_path))
    assert seen["recipe"] == big and isinstance(seen["model"], torch.nn.Module)
