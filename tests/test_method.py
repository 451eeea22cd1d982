"""The stage loop (METHOD.md section 3), the lgd CLI, redundancy (section 7) and the comparison report."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

from common import UserError, load_json
from conftest import run_cli
from curriculum import run_stages, union_files
from data import ImageSet, get_spec
from evaluate import compare, increments_of, redundancy_matrix, redundancy_report
from guidance import GuidanceConfig, generate_increment
from model import load_prior, make_student

SPEC = get_spec("digits")


def tree_hashes(folder):
    """{relative path: sha256} of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def stage_kwargs(prior):
    torch.manual_seed(0)
    reference = make_student("convnet", SPEC).eval()
    cfg = GuidanceConfig(guidance_scale=50.0, deviation_scale=1.0, candidates=2, guide_from=1, guide_until=4)
    return dict(prior=prior, spec=SPEC, ipc=3, stage_ipc=1, seed=5, reference=reference, cfg=cfg,
                student_epochs=2, steps=6, batch_size=20, cfg_scale=2.0)


class Killed(Exception):
    pass


def test_stage_loop_three_stages_kill_and_resume(pixel_prior, tmp_path):
    prior = load_prior(pixel_prior)
    run = str(tmp_path / "run")

    def kill_at_stage_2(k):
        if k == 2:
            raise Killed()
    with pytest.raises(Killed):
        run_stages(out_dir=run, on_stage_start=kill_at_stage_2, **stage_kwargs(prior))
    assert os.path.exists(f"{run}/stage_1/done.json") and not os.path.exists(f"{run}/stage_2")
    before = {k: tree_hashes(f"{run}/stage_{k}") for k in (0, 1)}

    run_stages(out_dir=run, **stage_kwargs(prior))  # the rerun resumes at stage 2 and completes
    for k in (0, 1):
        assert tree_hashes(f"{run}/stage_{k}") == before[k]  # finished stages untouched
    for k in range(3):
        files = sorted(os.path.relpath(p, f"{run}/stage_{k}/images") for p in union_files(run, SPEC, k + 1, 1)[0][-10:])
        assert files == [f"{c}/{k:05d}.png" for c in range(10)]  # stage k holds index k of every class
        assert os.path.exists(f"{run}/stage_{k}/grid.png") and os.path.exists(f"{run}/stage_{k}/done.json")
    # the student of stage k was trained on exactly the union of stages < k
    for k in (1, 2):
        trained_on = sorted(load_json(f"{run}/stage_{k}/student.json")["train_files"])
        union = sorted(f"{run}/stage_{j}/images/{c}/{j:05d}.png" for j in range(k) for c in range(10))
        assert trained_on == union
    assert not os.path.exists(f"{run}/stage_0/student.pt")  # the seed stage has no student
    # the union is the distilled set: 3 images per class, indices 0..2
    for c in range(10):
        assert sorted(os.listdir(f"{run}/distilled/{c}")) == ["00000.png", "00001.png", "00002.png"]


def test_stage_zero_is_the_unguided_dit_increment(pixel_prior, tmp_path):
    """Paired comparison: LGD's seed stage equals the first images of --method dit with the same seed."""
    prior = load_prior(pixel_prior)
    kwargs = stage_kwargs(prior)
    kwargs.update(ipc=1)
    run_stages(out_dir=str(tmp_path / "lgd"), **kwargs)
    generate_increment(prior, SPEC, str(tmp_path / "dit"), 1, 0, seed=5, cfg_scale=2.0, steps=6, batch_size=20)
    assert tree_hashes(tmp_path / "lgd" / "distilled") == tree_hashes(tmp_path / "dit")


def test_ipc_not_a_multiple_of_stage_ipc_is_an_error(pixel_prior, tmp_path):
    kwargs = stage_kwargs(load_prior(pixel_prior))
    kwargs.update(ipc=4, stage_ipc=3)
    with pytest.raises(UserError, match="not a multiple"):
        run_stages(out_dir=str(tmp_path), **kwargs)


def test_distill_lgd_cli_on_fake_imagewoof(tmp_path, latent_prior, fake_woof):
    """The full lgd path with a latent prior (VAE decode/encode in the loop): 2 stages of 1 IPC."""
    out = tmp_path / "run"
    r = run_cli("distill.py", "--dataset", "imagewoof", "--data-dir", fake_woof, "--prior", latent_prior,
                "--ipc", 2, "--stage-ipc", 1, "--steps", 4, "--guide-from", 0, "--guide-until", 3, "--batch-size", 12,
                "--student-epochs", 2, "--res", 16, "--out-dir", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for wnid in sorted(os.listdir(out / "distilled")):
        assert sorted(os.listdir(out / "distilled" / wnid)) == ["00000.png", "00001.png"]
    assert json.loads((out / "stage_1" / "done.json").read_text())["indices"] == [1, 2]
    assert (out / "stage_1" / "student.pt").exists() and (out / "grid.png").exists()
    assert list((tmp_path / "out" / "cache").glob("reference_imagewoof_convnet_res16_*.pt"))  # theta* cached
    # rerunning into the same folder with different settings is refused instead of mixing two runs
    r = run_cli("distill.py", "--dataset", "imagewoof", "--data-dir", fake_woof, "--prior", latent_prior,
                "--ipc", 2, "--stage-ipc", 1, "--guidance-scale", 3, "--res", 16, "--out-dir", out, cwd=tmp_path)
    assert r.returncode == 1 and "different" in r.stderr and "guidance_scale" in r.stderr


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    r = run_cli("distill.py", "--dry-run", "--out-dir", tmp_path / "plan", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "stage 4" in r.stdout and "100 images" in r.stdout
    assert not (tmp_path / "plan").exists() and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- redundancy

def test_redundancy_matrix_on_a_constructed_case():
    """Increment a's 'model' recognises increments a and a+1 only: R = I + superdiagonal."""
    spec = get_spec("digits")
    increments = [ImageSet([torch.full((1, 8, 8), k / 10.0)] * 10, list(range(10))) for k in range(4)]

    class Memoriser(torch.nn.Module):
        def __init__(self, known):
            super().__init__()
            self.known = known

        def forward(self, x):  # right label on images of the known increments, a fixed wrong one elsewhere
            pixel = x[:, 0, 0, 0] * spec.std[0] + spec.mean[0]  # undo the normalisation of the test transform
            k = torch.round(pixel * 10).long()
            right = torch.tensor([int(kk) in self.known for kk in k])
            labels = torch.arange(len(x)) % 10  # accuracy() batches the 10 images of an increment in order
            return torch.nn.functional.one_hot(torch.where(right, labels, (labels + 1) % 10), 10).float()

    matrix, off = redundancy_matrix(increments, spec, train=lambda inc, a: Memoriser({a, a + 1}))
    expected = np.eye(4) + np.eye(4, k=1)
    assert np.array_equal(np.array(matrix), expected)
    assert off == pytest.approx(3 / 12)  # 3 ones among the 12 off-diagonal cells


def test_increments_follow_generation_order(tmp_path):
    from common import save_png
    for c in range(10):
        for i in range(4):
            save_png(torch.full((1, 8, 8), i / 10), str(tmp_path / str(c) / f"{i:05d}.png"))
    incs = increments_of(str(tmp_path), SPEC, 2)
    assert len(incs) == 2 and len(incs[1]) == 20
    assert all(p.endswith(("00002.png", "00003.png")) for p in incs[1].items)
    with pytest.raises(UserError):
        increments_of(str(tmp_path), SPEC, 3)


def test_redundancy_report_and_compare(tmp_path):
    """A real (tiny) run of the report: JSON keys, heatmap PNG, then the comparison table."""
    from data import load_digits_split, sample_real_ipc
    real = sample_real_ipc(load_digits_split("train"), 2, seed=0)
    increments = [real.subset([c * 2 + k for c in range(10)]) for k in range(2)]
    result = redundancy_report(increments, SPEC, str(tmp_path / "a"), "real", epochs=2)
    saved = json.loads((tmp_path / "a" / "redundancy.json").read_text())
    assert np.array(saved["matrix"]).shape == (2, 2)
    assert saved["off_diagonal_mean"] == pytest.approx((saved["matrix"][0][1] + saved["matrix"][1][0]) / 2)
    assert saved == json.loads(json.dumps(dict(result, git_commit=saved["git_commit"])))
    from PIL import Image
    with Image.open(tmp_path / "a" / "redundancy.png") as im:
        assert im.size[0] > 100
    for name, acc in (("a", 0.9), ("b", 0.8)):
        ev = dict(dataset="digits", method=name, ipc=2, arch="convnet", runs=3, accs=[acc] * 3, acc_mean=acc,
                  acc_std=0.0, best_mean=acc, best_std=0.0)
        os.makedirs(tmp_path / name, exist_ok=True)
        (tmp_path / name / "eval.json").write_text(json.dumps(ev))
    md = compare([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "cmp.md"))
    lines = md.strip().splitlines()
    assert len(lines) == 4 and "90.0 +- 0.0 (n=3)" in lines[2] and "80.0" in lines[3]
    assert f"{100 * saved['off_diagonal_mean']:.1f}" in lines[2] and lines[3].split("|")[6].strip() == "-"
