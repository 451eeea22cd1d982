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
    IMAGEIDC,
    IMAGENET100,
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


# ----------------------------------------------------------------------------- the field's other subsets (#41)

ILSVRC = [f"n{i:08d}" for i in range(1000)]  # a stand-in ILSVRC-2012 tree: 1000 wnids whose sorted position is i


@pytest.fixture(scope="module")
def fake_ilsvrc(tmp_path_factory):
    """1000 class folders in train/ and val/; images only in the few the tests pick (the others are never read)."""
    root = str(tmp_path_factory.mktemp("ilsvrc"))
    make_fake_imagewoof(root, wnids=["n00000500", "n00000007", "n00000999"])
    for split in ("train", "val"):
        for w in ILSVRC:
            os.makedirs(f"{root}/{split}/{w}", exist_ok=True)
    return root


def test_imagenet100_is_cmcs_list_in_its_order_and_imageidc_its_first_ten():
    """The table's values are ImageNet-1K indices: positions among the sorted wnids (so sorted wnids give sorted
    indices) with the names torchvision ships for them; class c is line c of the list (Minimax / IDC order)."""
    assert len(IMAGENET100) == 100 and len(set(IMAGENET100.values())) == 100
    assert sorted(IMAGENET100.values()) == [IMAGENET100[w] for w in sorted(IMAGENET100)]
    spec = get_spec("imagenet100")
    assert spec.num_classes == 100 and spec.wnids[:3] == ["n02869837", "n01749939", "n02488291"]
    names = {r["wnid"]: r["name"] for r in class_table(spec)}
    assert (names["n02869837"], names["n01749939"], names["n02123045"], names["n02086240"]) == \
        ("bonnet", "green mamba", "tabby", "Shih-Tzu")
    assert sorted(IMAGEIDC) == ["n01749939", "n01773797", "n02091831", "n02107142", "n02488291", "n02869837",
                                "n03062245", "n04517823", "n04589890", "n13037406"]  # CoDA's misc/class_IDC.txt
    idc = get_spec("imageidc")
    assert idc.wnids == spec.wnids[:10] and idc.prior_labels == spec.prior_labels[:10]


def test_100_classes_train_two_thirds_of_the_epochs():
    """Minimax / IDC ipc_epoch: 2/3 of the 10-class length for 100 classes, rounded down to a hundred."""
    from train_student import epochs_for_ipc
    assert [epochs_for_ipc(ipc, "minimax", "imagenet100", 100) for ipc in (1, 10, 50, 100)] == [2000, 1300, 1000, 600]
    assert [epochs_for_ipc(ipc, "minimax", "imageidc", 10) for ipc in (1, 10, 50)] == [3000, 2000, 1500]


def test_imageidc_samples_its_classes_in_the_lists_order_with_their_imagenet_labels(tmp_path, latent_prior, capsys,
                                                                                   monkeypatch):
    import curriculum
    import guidance
    seen = []
    monkeypatch.setattr(curriculum, "sample", lambda prior, labels, *a, **k: seen.extend(labels.tolist()) or
                        guidance.sample(prior, labels, *a, **k))
    tree = make_fake_imagewoof(str(tmp_path / "idc"), wnids=list(IMAGEIDC))
    code, _ = cli(distill.main, ["--dataset", "imageidc", *DIT, "--ipc", 1, "--res", 16, "--data-dir", tree,
                                 "--prior", latent_prior, "--out-dir", tmp_path / "run"], capsys)
    assert code == 0
    table = json.loads((tmp_path / "run" / "classes.json").read_text())
    assert [r["wnid"] for r in table] == list(IMAGEIDC) and [r["prior_label"] for r in table] == list(IMAGEIDC.values())
    assert sorted(seen) == sorted(IMAGEIDC.values())  # each class sampled once, with its ImageNet-1K label


def test_a_class_list_picks_an_imagenet_subset_labelled_by_tree_position(tmp_path, latent_prior, capsys, monkeypatch,
                                                                         fake_ilsvrc):
    """--classes FILE: class c is line c of the file; the DiT's label, the wnid's position in the sorted tree."""
    import curriculum
    import guidance
    seen = []
    monkeypatch.setattr(curriculum, "sample", lambda prior, labels, *a, **k: seen.extend(labels.tolist()) or
                        guidance.sample(prior, labels, *a, **k))
    (tmp_path / "three.txt").write_text("# my subset\nn00000500\nn00000007   # a comment\n\nn00000999\n")
    code, _ = cli(distill.main, ["--dataset", "imagenet", "--classes", tmp_path / "three.txt", *DIT, "--ipc", 1,
                                 "--res", 16, "--data-dir", fake_ilsvrc, "--prior", latent_prior,
                                 "--out-dir", tmp_path / "run"], capsys)
    assert code == 0
    table = json.loads((tmp_path / "run" / "classes.json").read_text())
    assert [(r["index"], r["wnid"], r["prior_label"]) for r in table] == \
        [(0, "n00000500", 500), (1, "n00000007", 7), (2, "n00000999", 999)]
    assert sorted(seen) == [7, 500, 999]
    assert json.loads((tmp_path / "run" / "args.json").read_text())["classes"] == ["n00000500", "n00000007",
                                                                                   "n00000999"]
    assert sorted(os.listdir(tmp_path / "run" / "distilled")) == ["n00000007", "n00000500", "n00000999"]


@pytest.mark.parametrize("lines, fragment", [
    ("n00000500\nn00012345\n", "n00012345 is not a class folder"),
    ("n00000500\nn00000007\nn00000500\n", "n00000500 is on lines 1 and 3"),
    ("n00000500\ndog\n", "line 2: 'dog' is not a wnid"),
    ("n00000500\n", "lists 1 class(es)"),
])
def test_a_bad_class_list_is_refused_in_one_line_before_anything_is_written(tmp_path, latent_prior, capsys, lines,
                                                                             fragment, fake_ilsvrc):
    (tmp_path / "bad.txt").write_text(lines)
    one_error_line(*cli(distill.main, ["--dataset", "imagenet", "--classes", tmp_path / "bad.txt", *DIT,
                                       "--data-dir", fake_ilsvrc, "--prior", latent_prior,
                                       "--out-dir", tmp_path / "run"], capsys), fragment)
    assert not (tmp_path / "run").exists()


def test_class_lists_and_trees_that_cannot_work_are_refused(tmp_path, latent_prior, capsys):
    (tmp_path / "two.txt").write_text("n00000500\nn00000007\n")
    run = ["--prior", latent_prior, *DIT, "--out-dir", tmp_path / "run"]
    one_error_line(*cli(distill.main, ["--dataset", "imagewoof", "--classes", tmp_path / "two.txt", *run], capsys),
                   "use it with --dataset imagenet")
    for dataset in ("imageidc", "imagenet100", "imagenet"):  # no public archive: ILSVRC-2012 is the source
        one_error_line(*cli(distill.main, ["--dataset", dataset, *run], capsys),
                       f"{dataset} needs --data-dir pointing at ILSVRC-2012")
    idc = make_fake_imagewoof(str(tmp_path / "idc"), wnids=list(IMAGEIDC)[1:])  # a class short
    one_error_line(*cli(distill.main, ["--dataset", "imageidc", "--data-dir", idc, *run], capsys),
                   "lacks 1 class folders", list(IMAGEIDC)[0])
    wrong = tmp_path / "wrong"  # 1000 folders holding ImageIDC's, but not at ILSVRC-2012's positions
    for split in ("train", "val"):
        for w in ILSVRC[:990] + list(IMAGEIDC):
            (wrong / split / w).mkdir(parents=True)
    one_error_line(*cli(distill.main, ["--dataset", "imageidc", "--data-dir", wrong, *run], capsys),
                   "not ILSVRC-2012's")
    assert not (tmp_path / "run").exists()
