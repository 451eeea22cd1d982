"""The stage loop (the paper's incremental curriculum), the run folder, the lgd CLI, redundancy (paper Fig. 2) and
the comparison report."""
import json
import os

import numpy as np
import pytest
import torch

from common import UserError, load_json
from conftest import file_hashes, run_cli
from curriculum import Plan, Students, generate_increment, run_stages
from data import ImageSet, get_spec
from evaluate import compare, increments_of, redundancy_matrix, redundancy_report
from guidance import GuidanceConfig, Learnability, SamplerConfig
from model import load_prior, make_student
from run_folder import union_files
from train_student import reference_spec

SPEC = get_spec("digits")


def stage_kwargs(prior):
    torch.manual_seed(0)
    reference = [(make_student("convnet", SPEC).eval(), reference_spec(SPEC))]
    guide = GuidanceConfig(scale=50.0, deviation=1.0, candidates=2, guide_from=1, guide_until=4)
    return dict(prior=prior, spec=SPEC, plan=Plan(ipc=3, stage_ipc=1, seed=5, batch_size=20),
                sampler=SamplerConfig(cfg_scale=2.0, steps=6), guide=guide,
                students=Students("convnet", "minimax", SPEC, epochs=2), reference=reference)


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
    before = {k: file_hashes(f"{run}/stage_{k}") for k in (0, 1)}

    run_stages(out_dir=run, **stage_kwargs(prior))  # the rerun resumes at stage 2 and completes
    for k in (0, 1):
        assert file_hashes(f"{run}/stage_{k}") == before[k]  # finished stages untouched
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
    kwargs["plan"].ipc = 1
    run_stages(out_dir=str(tmp_path / "lgd"), **kwargs)
    generate_increment(prior, SPEC, str(tmp_path / "dit"), None, 1, 0, 5, SamplerConfig(cfg_scale=2.0, steps=6), 20)
    assert file_hashes(tmp_path / "lgd" / "distilled") == file_hashes(tmp_path / "dit")


def test_ipc_not_a_multiple_of_stage_ipc_is_an_error(pixel_prior, tmp_path):
    kwargs = stage_kwargs(load_prior(pixel_prior))
    kwargs["plan"].ipc, kwargs["plan"].stage_ipc = 4, 3
    with pytest.raises(UserError, match="not a multiple"):
        run_stages(out_dir=str(tmp_path), **kwargs)


def test_distill_lgd_cli_on_fake_imagewoof(tmp_path, latent_prior, fake_woof):
    """The full lgd path with a latent prior (VAE decode/encode in the loop): 2 stages of 1 IPC."""
    out = tmp_path / "run"
    r = run_cli("distill.py", "--dataset", "imagewoof", "--no-preflight", "--data-dir", fake_woof, "--prior", latent_prior,
                "--seed-set", "dit", "--ipc", 2, "--stage-ipc", 1, "--steps", 4, "--guide-from", 0, "--guide-until", 3, "--batch-size", 12,
                "--student-epochs", 2, "--res", 16, "--out-dir", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for wnid in sorted(os.listdir(out / "distilled")):
        assert sorted(os.listdir(out / "distilled" / wnid)) == ["00000.png", "00001.png"]
    assert json.loads((out / "stage_1" / "done.json").read_text())["indices"] == [1, 2]
    assert (out / "stage_1" / "student.pt").exists() and (out / "grid.png").exists()
    assert list((tmp_path / "out" / "cache").glob("surrogate_imagewoof_convnet_res16_*.pt"))  # theta* cached
    # rerunning into the same folder with different settings is refused instead of mixing two runs
    r = run_cli("distill.py", "--dataset", "imagewoof", "--no-preflight", "--data-dir", fake_woof, "--prior", latent_prior,
                "--seed-set", "dit", "--ipc", 2, "--stage-ipc", 1, "--guidance-scale", 3, "--res", 16, "--out-dir", out, cwd=tmp_path)
    assert r.returncode == 1 and "different" in r.stderr and "--guidance-scale" in r.stderr


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


# ----------------------------------------------------------------------------- what a stage leaves behind

def test_stages_save_final_latents_and_a_log_of_what_guidance_did(pixel_prior, tmp_path):
    prior = load_prior(pixel_prior)
    run = tmp_path / "run"
    run_stages(out_dir=str(run), **stage_kwargs(prior))
    for k in range(3):
        for c in range(10):
            latent = torch.load(run / f"stage_{k}" / "latents" / str(c) / f"{k:05d}.pt")
            from data import load_image
            image = load_image(str(run / f"stage_{k}" / "images" / str(c) / f"{k:05d}.png"), 1)
            # pixel space: the saved final latent is the image before clamping and 8-bit rounding
            assert latent.shape == (1, 8, 8)
            assert (((latent.clamp(-1, 1) + 1) / 2 - image).abs() <= 0.5 / 255 + 1e-6).all()
    assert not (run / "stage_0" / "log.json").exists()  # the seed stage is not guided
    for k in (1, 2):
        log = json.loads((run / f"stage_{k}" / "log.json").read_text())
        assert log["images_logged"] == 10 and sum(log["kept_candidate_counts"]) == 10
        assert log["kept"]["S"] >= log["rejected"]["S"]  # the kept candidate has the highest S of its slot
        assert set(log["twin"]) == {"S", "student_ce", "reference_ce"}
        assert sorted(map(int, log["relative_guidance_per_step"])) == [1, 2, 3, 4]  # the window only
        assert all(v > 0 for v in log["relative_guidance_per_step"].values())
        assert json.loads((run / f"stage_{k}" / "done.json").read_text())["sampler_batch"] == 20


def test_out_of_memory_halves_the_batch_and_keeps_the_images(pixel_prior, tmp_path, monkeypatch, capsys):
    """A batch that does not fit raises OutOfMemoryError: the block is retried at half the batch, and the
    images are those of an unconstrained run (each is seeded on its own; equal up to float rounding)."""
    import curriculum
    from data import load_image
    prior = load_prior(pixel_prior)
    kwargs = stage_kwargs(prior)
    score = Learnability(make_student("convnet", SPEC, seed=1), SPEC, *kwargs["reference"][0], 0.5)
    args = (prior, SPEC)
    run = lambda folder: generate_increment(*args, str(folder / "images"), str(folder / "latents"), 2, 3, 5,  # noqa
                                            kwargs["sampler"], 20, score=score, guide=kwargs["guide"], memory={})
    straight = run(tmp_path / "straight")
    original = curriculum.best_of_candidates

    def small_device(prior, labels, *rest, **kw):
        if len(labels) > 4:  # "the GPU" holds 4 samples
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(prior, labels, *rest, **kw)
    monkeypatch.setattr(curriculum, "best_of_candidates", small_device)
    halved = run(tmp_path / "halved")
    assert straight == 20 and halved == 5  # 20 -> 10 -> 5 (two classes x two candidates)
    assert capsys.readouterr().out.count("sampler batch halved") == 2  # said once per halving
    for c in range(10):
        for index in (3, 4):
            a, b = (load_image(str(tmp_path / d / "images" / str(c) / f"{index:05d}.png"), 1)
                    for d in ("straight", "halved"))
            assert (a - b).abs().max() <= 1 / 255 + 1e-6


def test_dry_run_json_is_the_resolved_configuration(tmp_path):
    r = run_cli("distill.py", "--dataset", "imagewoof", "--dry-run", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)
    assert config["student_view"] == dict(res=224, test="Resize(224) + CenterCrop(224)", mean=[0.485, 0.456, 0.406],
                                          std=[0.229, 0.224, 0.225])
    assert config["reference_view"]["res"] == 256 and config["reference_view"]["mean"] == [0.5] * 3
    assert config["guidance"]["form"] == "z" and config["guidance"]["scale"] == 15.0 and config["batch_size"] == 24
    assert config["guided_steps"] == 36 and config["student_norm"] == "instance norm"
    assert config["seed_set"] == "igd"  # the paper's pipeline: T_1 from IGD
    assert config["recipe_settings"]["lr"] == 0.01 and "RandomResizedCrop(224, 0.5-1)" in config["student_train_transform"]
    assert not (tmp_path / "out").exists()


def test_a_users_reference_model_replaces_the_trained_one(pixel_prior, tmp_path):
    from train_student import reference_spec as view_of
    theta = make_student("convnet", view_of(SPEC), seed=3)
    torch.save(theta.state_dict(), tmp_path / "theta.pt")
    r = run_cli("distill.py", "--dataset", "digits", "--prior", pixel_prior, "--ipc", 2, "--stage-ipc", 1, "--steps", 4,
                "--guide-from", 0, "--guide-until", 3, "--student-epochs", 1, "--no-eval", "--reference", tmp_path / "theta.pt", "--out-dir", tmp_path / "r",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "out" / "cache").exists()  # nothing trained on the real data
    assert json.loads((tmp_path / "r" / "args.json").read_text())["reference"] == str(tmp_path / "theta.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pt")
    r = run_cli("distill.py", "--dataset", "digits", "--prior", pixel_prior, "--ipc", 2, "--stage-ipc", 1, "--steps", 4,
                "--guide-from", 0, "--guide-until", 3, "--reference", tmp_path / "bad.pt", "--out-dir", tmp_path / "r2", cwd=tmp_path)
    assert r.returncode == 1 and "does not fit --arch convnet" in r.stderr.strip().splitlines()[-1]
