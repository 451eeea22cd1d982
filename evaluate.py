"""
Evaluation: how well a distilled set trains a fresh model (the field's protocol, train_student.py),
how redundant its increments are (the paper's redundancy analysis, Figures 1 and 2), and a side-by-side
report of several runs.

Accuracy. Train `--runs` seeded students of `--arch` on the set with a recipe of train_student.py and
test each on the real test split: acc = mean +- std (numpy std, ddof 0) over runs, as a fraction. We
report the final-epoch accuracy; `best` (the highest test accuracy seen at the recipe's 100 evenly
spaced checkpoints, as Minimax evaluates) is the selection-on-test number peers report, kept as a
second, labelled column. An evaluation with another architecture than the run's own (which guided
the sampling) is written to eval_<arch>.json: the cross-architecture column, where a gain must survive.

Redundancy (paper Fig. 2). Cut the set into K increments T_1..T_K of stage_ipc images per class (by
image index = generation order, so LGD stages and an unguided set are cut the same way), train a
model on T_a and test it on T_b's images with their labels:
    R[a, b] = acc(model_a, T_b),     redundancy = mean_{a != b} R[a, b]
High off-diagonal accuracy = the increments teach the same thing. (LGD maximises the current
student's loss on new increments, so a low R is partly optimised by construction: always read it
beside test accuracy.)

One mode per command (the flags below are exclusive; `--redundancy real --real-ipc K` is the one pair), and a
result goes only into the run it describes, the random-real draw's own folder, or a fresh --out folder.

Run:
  python evaluate.py --distilled out/digits_lgd_ipc10_seed0 --runs 3      # eval.json in that folder
  python evaluate.py --distilled out/digits_lgd_ipc10_seed0 --arch resnetap10   # eval_resnetap10.json
  python evaluate.py --dataset digits --real-ipc 10 --runs 3                  # out/digits_real_ipc10_seed0
  python evaluate.py --redundancy out/digits_lgd_ipc10_seed0              # redundancy.json + heatmap
  python evaluate.py --redundancy real --dataset digits --real-ipc 10     # the same for random real images
  python evaluate.py --validity out/digits_lgd_ipc10_seed0                # share theta* recognises
  python evaluate.py --compare out/digits_lgd_ipc10_seed0 out/digits_dit_ipc10_seed0 out/digits_real_ipc10_seed0
"""
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from data import DATASETS, EMBEDDED, ImageSet, class_table, get_spec, load_real, resolve_data_dir, sample_real_ipc
from ground.common import (
    SALT_EVAL_INIT,
    SALT_EVAL_TRAIN,
    SALT_REDUNDANCY_INIT,
    SALT_REDUNDANCY_TRAIN,
    ArgumentParser,
    UserError,
    atomic_write,
    check_writable,
    default_workers,
    get_device,
    git_commit,
    load_json,
    print0,
    quoted,
    require,
    run_cli,
    save_json,
    stream_seed,
)
from ground.folder import (
    check_classes,
    check_not_busy,
    check_output,
    cross_eval_paths,
    default_real_dir,
    distilled_folder,
    eval_path,
    heatmap_path,
    is_run_folder,
    redundancy_path,
    run_info,
    set_files,
    set_sha256,
    validity_path,
)
from model import ARCHS, make_student
from reference import reference_model, soft_label_teacher
from train_student import RECIPES, accuracy, epochs_for_ipc, eval_points, recipe_view, train_student

# ----------------------------------------------------------------------------- accuracy

def evaluate_set(train_set, test_set, view, arch="convnet", runs=3, recipe="minimax", epochs=None, seed=0,
                 device="cpu", ipc=None, num_workers=0, teacher=None):
    """Train `runs` seeded students on train_set, test on test_set -> dict of final and best accuracies.

    view: the recipe's view of the dataset (train_student.recipe_view).
    """
    ipc = len(train_set) // view.num_classes if ipc is None else ipc
    epochs = epochs_for_ipc(ipc, recipe, view.name, num_classes=view.num_classes) if epochs is None else epochs
    accs, bests = [], []
    for run in range(runs):  # airbench-style: mean +- std over seeded students, not one lucky run
        seen = []
        student = make_student(arch, view, seed=stream_seed(seed, SALT_EVAL_INIT, run))
        train_student(student, train_set, view, recipe, epochs, seed=stream_seed(seed, SALT_EVAL_TRAIN, run),
                      device=device, desc=f"eval {arch} run {run + 1}/{runs}", num_workers=num_workers,
                      teacher=teacher, eval_points=eval_points(view.name),
                      on_eval=lambda m: seen.append(accuracy(m, test_set, view, device, num_workers=num_workers)))
        accs.append(seen[-1])  # the final epoch's accuracy (the last checkpoint is the last epoch)
        # best-seen = model selection on the test set; reported only as a labelled second column
        bests.append(max(seen))
        print0(f"  run {run + 1}/{runs}: final {accs[-1]:.4f}, best {bests[-1]:.4f}")
    return dict(arch=arch, runs=runs, recipe=recipe, epochs=epochs, ipc=ipc, checkpoints=len(seen), accs=accs,
                acc_mean=float(np.mean(accs)), acc_std=float(np.std(accs)),
                best_accs=bests, best_mean=float(np.mean(bests)), best_std=float(np.std(bests)))


def logistic_regression(train_set, test_set):
    """Test accuracy of scikit-learn's multinomial logistic regression (lbfgs, C = 1) fitted on a set's raw pixels
    (digits 64, mnist 1024): a family that takes no part in any guidance, and deterministic (one number a set). The
    embedded datasets only: on 224 px images it is neither cheap nor meaningful."""
    from sklearn.linear_model import LogisticRegression  # the embedded datasets only, like digits itself
    pixels = lambda images: np.stack([images.load(i).flatten().numpy() for i in range(len(images))])
    model = LogisticRegression(max_iter=5000).fit(pixels(train_set), train_set.labels)
    return float(model.score(pixels(test_set), test_set.labels))


def evaluate_folder(run_dir, spec, data_dir, arch, runs=3, recipe="minimax", epochs=None, seed=0, device="cpu",
                    out=None, num_workers=0, teacher=None):
    """Evaluate the set of a run folder; write eval.json (the run's own arch) or eval_<arch>.json beside it."""
    info = run_info(run_dir)
    own = arch == info.get("arch", "convnet")
    out = out or eval_path(run_dir, None if own else arch)
    check_writable(os.path.dirname(os.path.abspath(out)))  # before the training, not after it
    paths, labels, spec.image_size = set_files(run_dir, spec)  # the run's set, complete, and nothing else
    train_set = ImageSet(paths, labels, channels=spec.channels)
    view = recipe_view(spec, recipe)
    test_set = load_real(spec, data_dir, "test")
    counts = train_set.counts(spec.num_classes)  # every class has >= 1 image (set_files refuses empty ones)
    if len(set(counts)) > 1:
        print0(f"note: {run_dir} holds different numbers of images per class: {counts}")
    print0(f"evaluating {run_dir}: {len(train_set)} images, {runs} x {arch} ({recipe} recipe)")
    if teacher is None:  # soft-label recipes need one; the CLI passes the one it already built
        teacher = soft_label_teacher(view, recipe, data_dir, device, num_workers=num_workers)
    result = evaluate_set(train_set, test_set, view, arch, runs, recipe, epochs, seed, device, num_workers=num_workers,
                          teacher=teacher, ipc=min(counts))
    result = dict(dataset=spec.name, method=info.get("method", "unknown"), guiding_arch=info.get("arch"),
                  reference_arch=info.get("reference_arch"),
                  **result, images_per_class=counts, distilled=os.path.abspath(run_dir),
                  subject=os.path.abspath(run_dir), set_sha256=set_sha256(run_dir))
    write_eval(result, out)
    return result


def write_eval(result, path):
    """Print the numbers, then write them: a failed write (disk full, read-only) loses no result."""
    print0(f"acc {result['acc_mean']:.4f} +- {result['acc_std']:.4f} (final epoch; best-seen "
           f"{result['best_mean']:.4f} +- {result['best_std']:.4f}) over {result['runs']} x {result['arch']}: "
           f"{json.dumps(result['accs'])}")
    save_json(dict(result, git_commit=git_commit()), path)  # every output says which code made it
    print0(f"-> {path}")


# ----------------------------------------------------------------------------- redundancy (paper Fig. 2)

def increments_of(run_dir, spec, stage_ipc):
    """Cut the set of a run folder (or a bare ImageFolder) into increments of stage_ipc images per class, in index
    order."""
    paths, labels, _ = set_files(run_dir, spec)
    folder = distilled_folder(run_dir)
    # names are zero-padded global indices, so sorted order = generation order = stage order
    by_class = [[p for p, y in zip(paths, labels) if y == c] for c in range(spec.num_classes)]
    ipc = min(len(files) for files in by_class)
    if ipc < stage_ipc or ipc % stage_ipc:
        raise UserError(f"{folder} has {ipc} images per class, not a multiple of --stage-ipc {stage_ipc}")
    return [ImageSet([files[i] for files in by_class for i in range(k * stage_ipc, (k + 1) * stage_ipc)],
                     [c for c in range(spec.num_classes) for _ in range(stage_ipc)], channels=spec.channels)
            for k in range(ipc // stage_ipc)]


def redundancy_matrix(increments, view, arch="convnet", recipe="minimax", epochs=None, seed=0, device="cpu",
                      train=None, teacher=None):
    """R[a, b] = accuracy on T_b of a model trained on T_a; returns (K x K list, off-diagonal mean).

    view: the recipe's view. train(increment, a) -> model can replace the student training (tests use it).
    """
    k = len(increments)
    matrix = np.zeros((k, k))
    for a in range(k):
        if train is not None:
            model = train(increments[a], a)
        else:
            ipc = len(increments[a]) // view.num_classes
            student = make_student(arch, view, seed=stream_seed(seed, SALT_REDUNDANCY_INIT, a))
            trained = epochs_for_ipc(ipc, recipe, view.name, num_classes=view.num_classes) if epochs is None else \
                epochs
            model = train_student(student, increments[a], view, recipe, trained,
                                  seed=stream_seed(seed, SALT_REDUNDANCY_TRAIN, a), device=device,
                                  desc=f"redundancy: train on T_{a + 1}", teacher=teacher)
        for b in range(k):  # T_b's images with their labels, seen through the test view
            matrix[a, b] = accuracy(model, increments[b], view, device)
    # the diagonal is training accuracy (a model on its own images): only a != b measures overlap
    return matrix.tolist(), float(matrix[~np.eye(k, dtype=bool)].mean())


def save_heatmap(matrix, path, title):
    """The K x K matrix as a PNG with the numbers printed in the cells (PIL only, no plotting library)."""
    k, cell, margin = len(matrix), 56, 70
    image = Image.new("RGB", (max(margin + k * cell + 10, 8 * len(title) + 20), margin + k * cell + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black")
    draw.text((10, 26), "rows: trained on T_a   cols: tested on T_b", fill="black")
    for a in range(k):
        draw.text((margin - 40, margin + a * cell + cell // 2 - 5), f"T_{a + 1}", fill="black")
        draw.text((margin + a * cell + cell // 2 - 10, margin - 16), f"T_{a + 1}", fill="black")
        for b in range(k):
            v = matrix[a][b]
            shade = int(255 * (1 - v))  # white = 0, dark blue = 1
            box = [margin + b * cell, margin + a * cell, margin + (b + 1) * cell - 1, margin + (a + 1) * cell - 1]
            draw.rectangle(box, fill=(shade, shade, 255), outline="gray")
            draw.text((box[0] + 12, box[1] + cell // 2 - 5), f"{100 * v:.1f}", fill="white" if v > 0.5 else "black")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def redundancy_report(increments, view, out_dir, label, subject=None, content=None, **kwargs):
    """Compute the matrix, print it, then write redundancy.json and redundancy.png in out_dir. content: the
    set_sha256 of the set cut (None for random real images)."""
    if len(increments) < 2:
        raise UserError(f"redundancy needs at least 2 increments to compare, {label} has {len(increments)} "
                        f"(pass a smaller --stage-ipc)")
    check_writable(out_dir)  # before the K trainings, not after them
    stage_ipc = len(increments[0]) // view.num_classes
    cut = f"{len(increments)} increments of {stage_ipc} images per class, in generation (index) order"
    print0(f"redundancy of {label}: {cut}")
    matrix, off = redundancy_matrix(increments, view, **kwargs)
    result = dict(label=label, subject=subject, set_sha256=content, increments=len(increments), stage_ipc=stage_ipc,
                  cut=cut,
                  arch=kwargs.get("arch", "convnet"), matrix=matrix, off_diagonal_mean=off,
                  diagonal_mean=float(np.mean(np.diag(matrix))))
    print0("\n".join(" ".join(f"{100 * v:5.1f}" for v in row) for row in matrix))
    print0(f"redundancy (off-diagonal mean) {off:.4f}")
    save_json(dict(result, git_commit=git_commit()), redundancy_path(out_dir))
    save_heatmap(matrix, heatmap_path(out_dir),
                 f"{label}: off-diagonal mean {100 * off:.1f}% ({len(increments)} x {stage_ipc} IPC)")
    print0(f"-> {redundancy_path(out_dir)}, {heatmap_path(out_dir)}")
    return result


# ----------------------------------------------------------------------------- validity

def validity_report(run_dir, spec, data_dir, device, num_workers=0, arch=None):
    """How many of a set's images theta* (the reference model the run used) classifies as their label:
    the "still a clean example of its class" side of learnability, per increment and overall. arch: judge with
    theta* of another architecture (validity_<arch>.json), e.g. one judge for runs that were guided differently."""
    info = run_info(run_dir)
    theirs = info.get("reference_arch") or info.get("arch", "convnet")  # the theta* that guided the run
    own = arch is None or arch == theirs
    arch = arch or theirs
    reference, view = reference_model(spec, arch, data_dir, device, epochs=info.get("reference_epochs"),
                                      num_workers=num_workers, path=info.get("reference") if own else None)
    stage_ipc = info.get("stage_ipc") or 1
    increments = increments_of(run_dir, spec, stage_ipc)
    per_increment = [accuracy(reference, inc, view, device) for inc in increments]
    result = dict(validity=float(np.mean(per_increment)), per_increment=per_increment, stage_ipc=stage_ipc,
                  reference_arch=arch, subject=os.path.abspath(run_dir), set_sha256=set_sha256(run_dir))
    print0(f"theta* ({arch}) recognises {100 * result['validity']:.1f}% of {run_dir} (per increment: "
           f"{' '.join(f'{100 * v:.0f}' for v in per_increment)})")
    save_json(dict(result, git_commit=git_commit()), validity_path(run_dir, None if own else arch))
    return result


# ----------------------------------------------------------------------------- comparison report

COMPARE = "evaluate.py --compare"  # the stamp of its tables: a later --compare may replace them, nothing else
REMAKE = {"eval": "--distilled", "redundancy": "--redundancy", "validity": "--validity"}


def current(path, run_dir):
    """A result JSON of a set folder, refused when it describes another set than the folder holds now (a result names
    its set by content, set_sha256: a set rerun or repaired since makes it stale). Random real images name no set."""
    result = load_json(path, what="result")
    if result.get("method") != "real" and is_run_folder(run_dir) and result.get("set_sha256") != set_sha256(run_dir):
        kind, _, arch = os.path.basename(path)[:-len(".json")].partition("_")  # eval_mlp: eval, mlp
        raise UserError(f"{path} describes another set than {run_dir} holds now (made before the set changed, or by "
                        f"an older lgd): make it again with python evaluate.py {REMAKE[kind]} {quoted(run_dir)}"
                        + (f" --arch {arch}" if arch else ""))
    return result


def compare(run_dirs, markdown_path):
    """One table over run folders holding eval.json (and eval_<arch>.json, redundancy.json, if computed)."""
    rows, other_archs = [], sorted({arch for d in run_dirs for arch in cross_eval_paths(d)})
    for run_dir in run_dirs:
        if not os.path.exists(eval_path(run_dir)):
            raise UserError(f"{run_dir} has no eval.json (run evaluate.py on it first)")
        read = lambda path: current(path, run_dir) if os.path.exists(path) else None
        ev, red = read(eval_path(run_dir)), read(redundancy_path(run_dir))
        row = [ev.get("dataset", "?"), ev.get("method", "?"), str(ev["ipc"]), ev["arch"],
               f"{100 * ev['acc_mean']:.1f} +- {100 * ev['acc_std']:.1f} (n={ev['runs']})",
               f"{100 * ev['best_mean']:.1f} +- {100 * ev['best_std']:.1f}"]
        for arch in other_archs:  # the same set, students the sampling never saw
            cross = read(eval_path(run_dir, arch))
            row.append("-" if cross is None else
                       f"{100 * cross['acc_mean']:.1f} +- {100 * cross['acc_std']:.1f} (n={cross['runs']})")
        valid = (read(validity_path(run_dir)) or {}).get("validity")
        cut = "-" if red is None else f"{100 * red['off_diagonal_mean']:.1f} ({red['increments']}x{red['stage_ipc']})"
        row += [cut, "-" if valid is None else f"{100 * valid:.1f}", run_dir]
        rows.append(row)
    # final and best-seen side by side: the honest number next to the one peers report
    header = (["dataset", "method", "IPC", "arch", "acc % (final)", "acc % (best seen)"] +
              [f"{arch} acc % (final)" for arch in other_archs] + ["redundancy % (cut)", "theta* recognises %", "run"])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in [header] + rows)
    print(text)
    md = f"<!-- written_by: {COMPARE} -->\n| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    md += "".join("| " + " | ".join(r) + " |\n" for r in rows)
    existed = os.path.exists(markdown_path)
    atomic_write(markdown_path, lambda tmp: open(tmp, "w").write(md))
    print(f"wrote {markdown_path}" + (" (replaced the previous table)" if existed else ""))
    return md


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    p = ArgumentParser(prog="evaluate.py", description="Evaluate distilled sets: accuracy, redundancy, comparison.")
    p.add_argument("--dataset", default=None, choices=DATASETS, help="default: from args.json")
    p.add_argument("--data-dir", default=None, help="ImageFolder root with train/ and val/ (default: from args.json)")
    p.add_argument("--distilled", default=None, help="a distill.py run folder or a bare <class>/*.png folder")
    p.add_argument("--real-ipc", type=int, default=None, help="baseline: K random real images per class")
    p.add_argument("--redundancy", default=None, help="run folder to cut into increments ('real' with --real-ipc)")
    p.add_argument("--stage-ipc", type=int, default=None, help="increment size for --redundancy (default: the run's)")
    p.add_argument("--validity", default=None, help="run folder: the share of its images theta* recognises")
    p.add_argument("--compare", nargs="+", default=None, help="run folders with eval.json -> one table")
    p.add_argument("--markdown", default="out/compare.md", help="where --compare writes its Markdown table")
    p.add_argument("--arch", default=None, choices=ARCHS,
                   help="student architecture (default: the run's, else convnet)")
    p.add_argument("--runs", type=int, default=3, help="seeded students")
    p.add_argument("--recipe", default=None, choices=list(RECIPES), help="training recipe (default: the run's)")
    p.add_argument("--epochs", type=int, default=None, help="default: by IPC (Minimax protocol)")
    p.add_argument("--res", type=int, default=None, help="classifier resolution (default: the dataset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the students (and of the real-image draw)")
    p.add_argument("--out", default=None, help="output folder (default: the run folder; real: out/<ds>_real_ipcK)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers decoding images (default: as "
                   "distill.py, 8 with CUDA, else 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    args = p.parse_args(argv)
    # one mode per command: two modes in one would run one of them and drop the other without a word
    modes = [flag for flag, given in (("--distilled", args.distilled), ("--validity", args.validity),
                                      ("--redundancy", args.redundancy), ("--compare", args.compare),
                                      ("--real-ipc", args.real_ipc is not None and args.redundancy != "real"))
             if given]
    if len(modes) > 1:
        raise UserError(f"one mode per command: {' and '.join(modes)} were given; run them one at a time "
                        f"(`--redundancy real --real-ipc K` is the one combination)")
    if args.compare:  # reads finished JSONs only: no dataset, no training
        check_output(args.markdown, "--markdown", COMPARE)
        compare(args.compare, args.markdown)
        return
    require(args.runs >= 1, f"--runs must be at least 1, got {args.runs}")
    require(args.real_ipc is None or args.real_ipc > 0, f"--real-ipc must be positive, got {args.real_ipc}")
    require(args.stage_ipc is None or args.stage_ipc > 0, f"--stage-ipc must be positive, got {args.stage_ipc}")
    require(args.epochs is None or args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}")
    require(args.res is None or args.res >= 8, f"--res must be at least 8, got {args.res}")
    require(args.seed >= 0, f"--seed must be >= 0, got {args.seed}")
    require(args.num_workers is None or args.num_workers >= 0, f"--num-workers must be >= 0, got {args.num_workers}")
    run_dir = args.distilled or args.validity or \
        (args.redundancy if args.redundancy not in (None, "real") else None)
    if run_dir is None and args.real_ipc is None:
        raise UserError("give --distilled DIR, --real-ipc K, --redundancy DIR, --validity DIR or --compare DIR ... "
                        "(to copy a set for RDED or DD-Ranking: python -m tools.export)")
    if args.redundancy == "real" and args.real_ipc is None:
        raise UserError("--redundancy real needs --real-ipc K (the random real images to cut into increments)")
    if run_dir is not None and not os.path.isdir(run_dir):
        raise UserError(f"{run_dir} does not exist")
    if run_dir is not None:  # a run still writing its folder would be read half-done (and written into)
        check_not_busy(run_dir)
    info = run_info(run_dir) if run_dir else {}
    if args.dataset and info.get("dataset") and args.dataset != info["dataset"]:  # before any data is looked for
        raise UserError(f"{run_dir} is a {info['dataset']} run (its args.json), not {args.dataset}: drop --dataset "
                        f"(a run folder knows its own)")
    # a run folder remembers its dataset, resolution, recipe, arch and (resolved) data dir: flags override them
    spec = get_spec(args.dataset or info.get("dataset", "digits"), res=args.res or info.get("res"),
                    classes=info.get("classes"))
    data_dir = resolve_data_dir(spec, args.data_dir or info.get("data_dir"))
    if run_dir is not None:  # class c of the run must be class c here (an older ImageWoof run numbered them sorted)
        check_classes(run_dir, class_table(spec))
    arch, recipe = args.arch or info.get("arch") or "convnet", args.recipe or info.get("recipe") or "minimax"
    device = get_device(args.device)
    args.num_workers = default_workers(device) if args.num_workers is None else args.num_workers
    if run_dir is not None:
        spec.image_size = set_files(run_dir, spec, quiet=True)[2]  # the reader below names what it leaves out
    if args.validity is not None:
        require(args.out is None, "--validity writes validity.json into the run it judges; drop --out")
        validity_report(run_dir, spec, data_dir, device, args.num_workers, args.arch)
        return
    view = recipe_view(spec, recipe)
    teacher = soft_label_teacher(view, recipe, data_dir, device, num_workers=args.num_workers)
    kwargs = dict(arch=arch, recipe=recipe, epochs=args.epochs, seed=args.seed, device=device, teacher=teacher)

    out = result_folder(args, run_dir, spec)
    if args.real_ipc is not None:  # the random-real baseline
        real = sample_real_ipc(load_real(spec, data_dir, "train"), args.real_ipc, args.seed)
        if args.redundancy == "real":  # the same matrix for random real images, cut in draw order
            stage_ipc = args.stage_ipc or min(args.real_ipc, 2 if spec.name in EMBEDDED else 10)
            order = [i for k in range(args.real_ipc // stage_ipc) for c in range(spec.num_classes)
                     for i in range(c * args.real_ipc + k * stage_ipc, c * args.real_ipc + (k + 1) * stage_ipc)]
            picked = real.subset(order)
            size = spec.num_classes * stage_ipc
            increments = [picked.subset(range(j, j + size)) for j in range(0, len(picked), size)]
            redundancy_report(increments, view, out, f"real IPC {args.real_ipc}", args.subject, **kwargs)
            return
        result = evaluate_set(real, load_real(spec, data_dir, "test"), view, arch, args.runs, recipe, args.epochs,
                              args.seed, device, ipc=args.real_ipc, num_workers=args.num_workers, teacher=teacher)
        write_eval(dict(dataset=spec.name, method="real", subject=args.subject, draw_seed=args.seed, **result),
                   eval_path(out, None if arch == "convnet" else arch))
    elif args.redundancy is not None:
        stage_ipc = args.stage_ipc or info.get("stage_ipc")
        if not stage_ipc:
            raise UserError("--redundancy needs --stage-ipc (the run has no args.json)")
        increments = increments_of(run_dir, spec, stage_ipc)
        redundancy_report(increments, view, out, f"{info.get('method', run_dir)}", args.subject,
                          set_sha256(run_dir), **kwargs)
    else:
        evaluate_folder(run_dir, spec, data_dir, arch, args.runs, recipe, args.epochs, args.seed, device,
                        out=eval_path(out, None if arch == info.get("arch", "convnet") else arch),
                        num_workers=args.num_workers, teacher=teacher)


def subject(run_dir, spec, real_ipc, seed):
    """What a result describes, written into it: a run folder (its absolute path), or a draw of random real images."""
    return os.path.abspath(run_dir) if run_dir is not None else f"{spec.name}: {real_ipc} random real images per " \
        f"class, draw seed {seed}"


def result_folder(args, run_dir, spec):
    """Where this command's result goes, checked before any training: into the run it describes, or the real
    baseline's own folder (its seed in the name), or a fresh --out folder. Never into another run, and never over
    another set's result."""
    own = run_dir if run_dir is not None else default_real_dir(spec.name, args.real_ipc, args.seed)
    out, args.subject = args.out or own, subject(run_dir, spec, args.real_ipc, args.seed)
    if os.path.abspath(out) != os.path.abspath(own):
        if is_run_folder(out):
            raise UserError(f"--out {out} is another run's folder: its results would be replaced by {own}'s; give a "
                            f"new folder, or drop --out to write into {own}")
        others = [name for name in (os.listdir(out) if os.path.isdir(out) else [])
                  if not (name.endswith(".json") and load_json(os.path.join(out, name)).get("subject") == args.subject)
                  and name != os.path.basename(heatmap_path(out))]
        if others:
            raise UserError(f"--out {out} holds files that are not results of {args.subject} ({others[0]}, ...): give "
                            f"a new folder, or drop --out to write into {own}")
    try:
        check_writable(out)  # before the training, not after it
    except (UserError, OSError) as e:
        raise UserError(f"cannot write in {out} ({e.strerror if isinstance(e, OSError) else e}): give --out NEWDIR "
                        f"for the results") from None
    return out


if __name__ == "__main__":
    run_cli(main)
