"""The datasets (data.py): the digits split, the field's class order, the ImageFolder trees it reads and the files it
refuses, the download's failure."""
import json
import os

import pytest
import torch

import distill
from conftest import (
    FIELD_WOOF,
    FIELD_WOOF_IDS,
    FIELD_WOOF_NAMES,
    cli,
    in_process,
    make_fake_imagewoof,
    one_error_line,
)
from data import (
    class_table,
    get_spec,
    load_real,
)
from ground.common import save_png
from ground.folder import seed_set_files

DIT = ["--method", "dit", "--steps", 3, "--batch-size", 8, "--no-preflight"]  # stand-in priors fail a preflight


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


def test_malformed_tree_names_the_expected_layout(tmp_path):
    (tmp_path / "tree" / "train").mkdir(parents=True)
    r = in_process("distill.py", "--dataset", "imagewoof", "--data-dir", tmp_path / "tree", "--method", "dit",
                   cwd=tmp_path)
    assert r.returncode == 1 and "val" in r.stderr and "<wnid>" in r.stderr and "Traceback" not in r.stderr


def test_partial_imagenet_tree_is_refused(tmp_path):
    """ImageNet-1K labels are positions among the 1000 sorted wnids: a partial tree would mislabel every class."""
    for split in ("train", "val"):
        (tmp_path / "inet" / split / "n01440764").mkdir(parents=True)
    r = in_process("distill.py", "--dataset", "imagenet", "--data-dir", tmp_path / "inet", "--method", "dit",
                   cwd=tmp_path)
    assert r.returncode == 1 and "1000 ILSVRC-2012 class folders" in r.stderr and "found 1" in r.stderr


FIELD_NETTE_IDS = [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]  # DD-Ranking / MTT `imagenette` (sorted wnids)


def test_class_index_is_the_fields():
    woof, nette = get_spec("imagewoof"), get_spec("imagenette")
    assert woof.wnids == FIELD_WOOF and woof.prior_labels == FIELD_WOOF_IDS
    assert [r["name"] for r in class_table(woof)] == FIELD_WOOF_NAMES  # prior label c is the dog of class c
    assert nette.wnids == sorted(nette.wnids) and nette.prior_labels == FIELD_NETTE_IDS


def test_a_seed_set_with_igds_unpadded_names_is_read_in_numeric_order(tmp_path):
    """IGD writes 0.png .. 99.png: at --stage-ipc 3 the seed is 0, 1, 2 (sorted names would give 0, 1, 10)."""
    spec = get_spec("digits")
    for c in range(10):
        for i in range(12):
            save_png(torch.full((1, 8, 8), i / 12), str(tmp_path / str(c) / f"{i}.png"))
    assert [os.path.basename(p) for p in seed_set_files(str(tmp_path), spec, 3)[4]] == ["0.png", "1.png", "2.png"]
    assert [os.path.basename(p) for p in seed_set_files(str(tmp_path), spec, 10)[0]] == [f"{i}.png" for i in range(10)]


def test_corrupt_image_in_data_dir_is_reported_by_path(tmp_path, latent_prior, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    woof = make_fake_imagewoof(str(tmp_path / "woof"), corrupt=True)
    one_error_line(*cli(distill.main, ["--dataset", "imagewoof", *DIT[2:], "--seed-set", "dit", "--guide-from", 0,
                                       "--guide-until", 2, "--ipc", 2, "--stage-ipc", 1,
                                       "--student-epochs", 1, "--reference-epochs", 1, "--res", 16, "--data-dir", woof,
                                       "--prior", latent_prior, "--out-dir", tmp_path / "run"], capsys), "broken.JPEG")


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_empty_class_folder_is_refused_by_name(tmp_path, latent_prior, capsys, split):
    woof = make_fake_imagewoof(str(tmp_path / "woof"))
    wnid = sorted(os.listdir(f"{woof}/{split}"))[3]
    for f in os.listdir(f"{woof}/{split}/{wnid}"):
        os.remove(f"{woof}/{split}/{wnid}/{f}")
    code, lines = cli(distill.main, ["--dataset", "imagewoof", *DIT, "--data-dir", woof, "--prior", latent_prior,
                                     "--out-dir", tmp_path / "run"], capsys)
    one_error_line(code, lines, wnid, f"{split}/{wnid}")
    assert not (tmp_path / "run").exists()


def test_a_failed_download_names_its_url_size_and_layout_and_the_fix_runs_in_the_same_folder(
        tmp_path, monkeypatch, capsys, latent_prior, fake_woof):
    import data

    def offline(url, download_root, md5=None):
        raise OSError("no route to host")
    monkeypatch.setattr(data, "download_and_extract_archive", offline)
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", "imagewoof", "--method", "dit", "--no-preflight", "--ipc", 1, "--steps", 2, "--prior",
            latent_prior, "--res", 16, "--out-dir", tmp_path / "run"]
    one_error_line(*cli(distill.main, argv, capsys), "could not download imagewoof from "
                   "https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2.tgz (about 1.3 GB",
                   "--data-dir DIR with DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG")
    assert not (tmp_path / "run").exists() and not os.listdir(tmp_path / "out" / "data")  # no args.json, no debris
    assert cli(distill.main, argv + ["--data-dir", fake_woof], capsys)[0] == 0  # the corrected command, same folder
    assert json.loads((tmp_path / "run" / "args.json").read_text())["data_dir"] == str(fake_woof)


def test_the_mnist_split_is_stratified_disjoint_and_fixed_by_its_seed(monkeypatch):
    import data
    train, test = data.load_mnist_split("train"), data.load_mnist_split("test")
    assert train.counts(10) == [400] * 10 and test.counts(10) == [100] * 10
    x_train, x_test = torch.stack(train.items), torch.stack(test.items)
    assert x_train.shape == (4000, 1, 32, 32) and x_train[:, :, :2].abs().sum() == 0  # 2 px of background padding
    key = lambda x: {row.numpy().tobytes() for row in x.flatten(1)}
    assert not key(x_train) & key(x_test)  # no image in both
    assert abs(float(x_train.mean()) - data.MNIST_MEAN[0]) < 1e-3
    assert abs(float(x_train.std()) - data.MNIST_STD[0]) < 1e-3
    again = data.load_mnist_split("train")
    assert torch.equal(torch.stack(again.items), x_train) and again.labels == train.labels  # fixed
    monkeypatch.setattr(data, "MNIST_SPLIT_SEED", 1)
    assert not torch.equal(torch.stack(data.load_mnist_split("train").items), x_train)  # drawn with its seed
