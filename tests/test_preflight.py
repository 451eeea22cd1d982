"""The preflight (preflight.py): on a prior whose samples are real digits it passes; a label map that sends class c
elsewhere, or a guidance that lowers S, stops the run in one line; the batch it picks under a (simulated) memory
limit is the batch the run starts at; its JSON has every key and agrees with the run that follows."""
import json
import os

import pytest
import torch

import distill
import guidance
import train_prior
from conftest import cli, in_process, make_empirical_prior, one_error_line
from tools import preflight

KEYS = {"recognised", "chance", "guidance", "sampler_batch", "eta_s", "eta_stages_s", "disk_bytes", "measured",
        "passed", "stages", "pixels", "batch_search"}
# digits, LGD at IPC 4 in 2 stages of 2, on the exact-denoiser prior ("--prior empirical" is patched in below)
RUN = ["--prior", "empirical", "--ipc", 4, "--stage-ipc", 2, "--student-epochs", 5, "--reference-epochs", 10,
       "--no-eval"]


@pytest.fixture
def empirical(monkeypatch, tmp_path):
    """The run's prior loader (train_prior.load_run_prior) returns the exact denoiser of 20 real digits per class (its
    samples are digits); the test may permute which class's images a label denoises to. Runs in tmp_path (its own
    theta* cache)."""
    monkeypatch.chdir(tmp_path)
    state = {"permute": None}

    def load(*args, **kwargs):
        prior = make_empirical_prior()
        if state["permute"] is not None:  # label y now denoises to class permute[y]'s images
            prior.transformer.labels = torch.tensor(state["permute"])[prior.transformer.labels]
        return prior
    monkeypatch.setattr(train_prior, "load_prior", load)
    return state


def test_the_exact_denoiser_prior_passes_and_the_json_has_every_key(empirical, tmp_path, capsys):
    out = []
    assert cli(distill.main, [*RUN, "--preflight", "--out-dir", tmp_path / "run"], capsys, out)[0] == 0
    result = json.loads((tmp_path / "run" / "preflight.json").read_text())
    assert KEYS <= set(result) and result["passed"] and result["failure"] is None
    assert result["samples_checked"] == 30 and result["recognised"] >= 24  # 3 a class, real digits: theta* knows them
    assert result["chance"] == 0.1 and result["world_size"] == 1
    g = result["guidance"]
    assert g["gain"] == pytest.approx(g["s_guided"] - g["s_twin"]) and g["gain"] > 0 and g["nan_fallbacks"] == 0
    assert 0 < g["relative_push"] < 1  # one guided step mid-window: a share of ||z_t||
    assert len(result["eta_stages_s"]) == result["stages"] == 2 and result["eta_s"] >= sum(result["eta_stages_s"]) > 0
    assert (tmp_path / "run" / "preflight.png").stat().st_size > 1000
    assert "prior + labels" in out[0] and "next: the same command without --preflight" in out[0]
    assert "disk: " in out[0] and "hub: " not in out[0]  # the machine's lines, but not the hub's: the prior is loaded
    # --dry-run now prints the measured ETA
    assert cli(distill.main, [*RUN, "--dry-run", "--out-dir", tmp_path / "run"], capsys, out)[0] == 0
    assert "ETA " in out[-1] and "measured by the preflight" in out[-1]
    # a run priced above a day says so in one line before it starts, and runs
    (tmp_path / "run" / "preflight.json").write_text(json.dumps(dict(result, eta_s=3 * 86400.0)))
    assert cli(distill.main, [*RUN, "--out-dir", tmp_path / "run"], capsys, out)[0] == 0
    assert "note: this run is priced at 3.0 days" in out[-1] and (tmp_path / "run" / "distilled").is_dir()


def test_a_permuted_label_map_stops_with_the_label_line(empirical, tmp_path, capsys):
    empirical["permute"] = [(c + 1) % 10 for c in range(10)]  # the "class-embedding rows" moved by one
    one_error_line(*cli(distill.main, [*RUN, "--preflight", "--out-dir", tmp_path / "run"], capsys),
                   "error: preflight: theta* recognises", "unguided samples of their class (chance 3/30)",
                   "check the class order / label map, the VAE and its scaling, the prior")
    result = json.loads((tmp_path / "run" / "preflight.json").read_text())  # written first, to look at
    assert not result["passed"] and result["recognised"] <= 6
    assert not (tmp_path / "run" / "args.json").exists()  # no settings recorded: the fixed command may run here


def test_a_flipped_guidance_sign_stops_with_the_direction_line(empirical, tmp_path, capsys, monkeypatch):
    original = guidance.guided_output

    def flipped(*args, **kwargs):
        out, push, bad = original(*args, **kwargs)
        return out, -push, bad
    monkeypatch.setattr(guidance, "guided_output", flipped)
    one_error_line(*cli(distill.main, [*RUN, "--preflight", "--out-dir", tmp_path / "run"], capsys),
                   "error: preflight: guidance does not raise S on these weights",
                   "check the guidance sign and its scale")
    assert json.loads((tmp_path / "run" / "preflight.json").read_text())["guidance"]["gain"] < 0


def test_the_batch_that_fits_is_picked_and_the_run_starts_at_it(empirical, tmp_path, capsys, monkeypatch):
    """A device that holds at most 16 samples in a guided step: the search (from the preset 128, capped at one class
    block of 30) finds 15 (multiples of kappa = 3), keeps 10% headroom (12), and the run samples at 12 without
    ever halving."""
    original, seen = guidance.guided_output, []

    def small_device(prior, z, *args, **kwargs):
        seen.append(len(z))
        if len(z) > 16:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(prior, z, *args, **kwargs)
    monkeypatch.setattr(guidance, "guided_output", small_device)
    monkeypatch.setattr(preflight, "guided_output", small_device)
    out = []
    assert cli(distill.main, [*RUN, "--preflight", "--out-dir", tmp_path / "run"], capsys, out)[0] == 0
    result = json.loads((tmp_path / "run" / "preflight.json").read_text())
    assert result["batch_search"]["largest_that_fitted"] == 15 and result["sampler_batch"] == 12
    assert result["batch_search"]["first_out_of_memory"] == 18
    assert json.loads((tmp_path / "run" / "args.json").read_text())["batch_size"] == 12  # recorded for the run
    seen.clear()
    assert cli(distill.main, [*RUN, "--out-dir", tmp_path / "run"], capsys, out)[0] == 0  # the same command, run
    assert "passed earlier" in out[-1] and "halved" not in out[-1]
    assert max(seen) == 12  # guided batches of 4 classes x 3 candidates
    done = json.loads((tmp_path / "run" / "stage_1" / "done.json").read_text())
    assert done["sampler_batch"] == 12 and len(list((tmp_path / "run").glob("stage_*/done.json"))) == result["stages"]


def test_the_batch_search_bisects_to_the_largest_fit():
    """pick_batch on a pretend device: grow by doubling, bisect, keep 90% (in multiples of kappa)."""
    from data import get_spec
    spec = get_spec("imagenet", num_classes=1000)
    for limit, expected in [(100, (87, 99, 102)), (3000, (3000, 3000, None)), (7, (3, 6, 9))]:
        fits = lambda b: b <= limit
        original = preflight._fits
        preflight._fits = lambda prior, spec, sampler, guide, b, device, score: fits(b)
        try:
            assert preflight.pick_batch(None, spec, None, None, 24, 3, "cpu") == expected, limit
        finally:
            preflight._fits = original


def test_a_non_digits_run_starts_with_the_preflight(tmp_path, latent_prior, fake_woof):
    """ImageWoof on the random tiny latent prior (VAE in the loop): the run does the preflight first by itself, every
    part of it (IGD's seed and step priced, the evaluation priced), and stops at its first failed check, the latent
    scale: random weights sample latents far wider than the real images' scaled latents. --no-preflight runs without
    it."""
    args = ["distill.py", "--dataset", "imagewoof", "--data-dir", fake_woof, "--prior", latent_prior, "--res", 16,
            "--ipc", 2, "--stage-ipc", 1, "--steps", 6, "--guide-from", 0, "--guide-until", 5, "--set", "igd_from=1",
            "--set", "igd_until=4", "--set", "grad_ipc=3", "--reference-epochs", 3, "--student-epochs", 2, "--eval"]
    r = in_process(*args, "--out-dir", tmp_path / "run", cwd=tmp_path)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("error: preflight: the real images' latents"), last
    result = json.loads((tmp_path / "run" / "preflight.json").read_text())
    assert {"igd_step_s", "igd_real_gradient_s", "eval_image_s", "test_pass_s"} <= set(result["measured"])
    assert "surrogate_s" not in result["eta_other_s"]  # IGD's surrogate is theta*'s trajectory: trained once, here
    assert "eval_s" in result["eta_other_s"] and len(result["eta_stages_s"]) == 2 and result["eta_stages_s"][0] > 0
    assert not (tmp_path / "run" / "args.json").exists() and not (tmp_path / "run" / "stage_0").exists()
    r = in_process(*args, "--no-preflight", "--no-eval", "--out-dir", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # the same folder: a failed preflight leaves nothing to resume or refuse


@pytest.mark.parametrize("damage", [lambda r: [r], lambda r: {k: v for k, v in r.items() if k != "settings"},
                                    lambda r: dict(r, eta_s="soon")])
def test_a_hand_edited_preflight_json_is_one_line_with_its_remedy(empirical, tmp_path, capsys, damage):
    run = tmp_path / "run"
    assert cli(distill.main, [*RUN, "--preflight", "--out-dir", run], capsys)[0] == 0
    path = run / "preflight.json"
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    for flags in (["--dry-run"], []):  # the plan and the run both read it
        one_error_line(*cli(distill.main, [*RUN, *flags, "--out-dir", run], capsys),
                       f"preflight result {path} is not one the preflight wrote", "delete it and rerun")
    os.remove(path)
    assert cli(distill.main, [*RUN, "--out-dir", run], capsys)[0] == 0  # the way out works


def test_a_typed_batch_size_is_never_replaced_by_the_preflights(empirical, tmp_path, capsys):
    """The preflight would pick 30 here (one class block); a --batch-size the user typed is checked, not replaced."""
    run = tmp_path / "run"
    assert cli(distill.main, [*RUN, "--preflight", "--batch-size", 7, "--out-dir", run], capsys)[0] == 0
    assert json.loads((run / "preflight.json").read_text())["sampler_batch"] == 7
    assert json.loads((run / "args.json").read_text())["batch_size"] == 7
    assert cli(distill.main, [*RUN, "--batch-size", 7, "--out-dir", run], capsys)[0] == 0
    assert json.loads((run / "stage_1" / "done.json").read_text())["sampler_batch"] == 7
    assert cli(distill.main, [*RUN, "--preflight", "--out-dir", tmp_path / "fresh"], capsys)[0] == 0
    assert json.loads((tmp_path / "fresh" / "args.json").read_text())["batch_size"] == 30  # not typed: the search


def test_a_preflight_of_a_run_that_exists_reports_at_the_runs_batch(empirical, tmp_path, capsys):
    """The README's order: a run first (no preflight on digits), then `--preflight` on the same folder."""
    run = tmp_path / "run"
    assert cli(distill.main, [*RUN, "--out-dir", run], capsys)[0] == 0
    before = json.loads((run / "args.json").read_text())["batch_size"]
    out = []
    assert cli(distill.main, [*RUN, "--preflight", "--out-dir", run], capsys, out)[0] == 0
    assert json.loads((run / "preflight.json").read_text())["sampler_batch"] == before == 128
    assert json.loads((run / "args.json").read_text())["batch_size"] == 128


@pytest.mark.parametrize("method", ["dit", "mgd3"])
def test_a_dit_or_mgd3_preflight_trains_no_theta_star(empirical, tmp_path, capsys, method):
    """A DiT or MGD3 set uses no theta*: its preflight does not train one (the label check says why it was not made),
    and MGD3's is priced as an unguided pass."""
    out = []
    assert cli(distill.main, ["--method", method, *RUN, "--preflight", "--out-dir", tmp_path / "run"], capsys,
               out)[0] == 0
    result = json.loads((tmp_path / "run" / "preflight.json").read_text())
    assert result["recognised"] is None and result["passed"]
    assert f"not checked: a {method} set trains no theta*" in out[0]
    assert not (tmp_path / "out" / "cache").exists()


@pytest.mark.slow
@pytest.mark.parametrize("scale,passes", [(1.0, True), (2.0, False), (0.5, False)])
def test_a_vae_with_the_wrong_scaling_factor_fails_the_preflight(mnist_prior, tmp_path, capsys, monkeypatch, scale,
                                                                 passes):
    """The latent tier's preflight on a prior whose samples are real latents (the exact denoiser of real images'
    scaled latents): with the VAE's own scaling factor the samples spread like the real images' latents; with a
    factor 2x off either way, the run stops on that check, naming the scaling factor. (The decoded pixels move too
    little to tell: the decoder's group norms absorb most of a global scale.)"""
    from conftest import make_empirical_latent_prior
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_prior, "load_prior", lambda *a, **k: make_empirical_latent_prior(
        os.path.join(mnist_prior, "vae"), scale=scale))
    argv = ["--dataset", "mnist", "--method", "dit", "--prior", "stand-in", "--ipc", 2, "--preflight",
            "--out-dir", tmp_path / "run"]
    code, lines = cli(distill.main, argv, capsys)
    result = json.loads((tmp_path / "run" / "preflight.json").read_text())
    assert result["passed"] == passes and preflight.latents_ok(result["latents"]) == passes
    if not passes:
        one_error_line(code, lines, "the real images' latents (encoded, times the VAE's scaling factor",
                       "check the VAE and its scaling factor")


@pytest.mark.parametrize("dataset,passes", [("digits", 100), ("mnist", 10)])
def test_the_eta_prices_the_test_passes_the_evaluation_makes(dataset, passes):
    """The evaluation's price counts the best-seen column's test passes per student as train_student makes them
    (mnist: 10, not Minimax's 100): with every other cost zero, eval_s is runs x passes x one pass."""
    from types import SimpleNamespace

    from data import get_spec
    from guidance import GuidanceConfig
    from igd import igd_guidance
    m = {"unguided_step_s": {str(b): 0.0 for b in range(1, 2000)}, "eval_image_s": 0.0, "test_pass_s": 1.5}
    args = SimpleNamespace(steps=50, method="dit", ipc=10, eval=True, recipe="minimax", student_epochs=None)
    eta = preflight.estimate(args, get_spec(dataset), GuidanceConfig(), igd_guidance(), 10, 1, m)
    assert eta["eta_other_s"]["eval_s"] == pytest.approx(3 * passes * 1.5, rel=1e-9)


def test_the_batch_fits_igds_step_too(empirical, tmp_path, capsys, monkeypatch):
    """LGD on IGD's seed samples both steps at one sampler batch: on a device where IGD's per-sample double backward
    holds at most 4 samples (and a learnability step 30), the preflight sizes IGD's step too and the run starts at a
    batch both fit, instead of dying in IGD's sampling."""
    from igd import Influence
    original = preflight._step

    def small_device(prior, spec, sampler, guide, b, device, score):
        if isinstance(score, Influence) and b > 4:
            raise RuntimeError("CUDA error: out of memory (simulated)")  # as a RuntimeError, as CUDA may raise it
        return original(prior, spec, sampler, guide, b, device, score)
    monkeypatch.setattr(preflight, "_step", small_device)
    assert cli(distill.main, [*RUN, "--seed-set", "igd", "--set", "grad_ipc=5", "--preflight", "--out-dir",
                              tmp_path / "run"], capsys)[0] == 0
    result = json.loads((tmp_path / "run" / "preflight.json").read_text())
    assert result["batch_search"]["igd"]["largest_that_fitted"] == 4 and result["sampler_batch"] <= 4
    assert set(map(int, result["measured"]["igd_step_s"])) <= {1, 2, 3, 4}  # timed only at sizes that fit


def test_the_eta_is_shared_by_the_ranks_where_the_ranks_share_the_work():
    """Sampling is dealt to the ranks block by block and a DDP student's images are split between them: on 2 ranks a
    stage costs half; the evaluation is one process's. A student is billed per image, whatever its batch."""
    from types import SimpleNamespace

    from data import get_spec
    from guidance import GuidanceConfig
    from igd import igd_guidance
    sizes = {str(b): 1.0 for b in range(1, 2000)}
    m = dict(unguided_step_s=sizes, guided_step_s=sizes, student_image_s=0.01, eval_image_s=0.01, test_pass_s=0.0)
    args = SimpleNamespace(steps=50, method="lgd", seed_set="dit", ipc=4, stage_ipc=2, eval=True, recipe="minimax",
                           student_epochs=10)
    spec, guide, igd_guide = get_spec("imagenette"), GuidanceConfig(), igd_guidance()
    one, two = (preflight.estimate(args, spec, guide, igd_guide, 15, 3, m, world)["eta_stages_s"] for world in (1, 2))
    # T_1: 2 slots x one batch of 10 (on 2 ranks one of 5 each, a step costs the same here); a guided stage: 2 slots x
    # 2 blocks of 5 classes x 3 candidates (one block a rank), then 10 epochs of 20 images at 0.01 s each
    assert one == pytest.approx([2 * 50, 2 * 2 * 50 + 10 * 20 * 0.01])
    assert two == pytest.approx([2 * 50, 2 * 50 + 1])
    evals = [preflight.estimate(args, spec, guide, igd_guide, 15, 3, m, w)["eta_other_s"]["eval_s"] for w in (1, 2)]
    assert evals[0] == evals[1] > 0
