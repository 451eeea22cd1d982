"""
What guidance did, image by image and stage by stage: the records behind every guided stage's log.json.

Each guided image gets a record beside it (stage_<k>/records/<class>/<index>.json), written before its PNG: its
kappa candidates' score parts (S, student CE, theta* CE), the candidate kept, its unguided twin's parts (the same
noise without guidance), the relative size of each guided push per respaced step i, and the gradient decoder's
cosine to the exact one where it was checked. A stage's log.json is summed from the records on disk, so it
describes every image of the stage however many starts the stage took; log_line is the one line a stage prints.
"""
import torch


def image_record(n, report):
    """What guidance did for the n-th image of a batch (its kappa candidates are samples n*kappa .. +kappa-1), from
    the sampler's report (curriculum.sample_images): every candidate's score parts, which one was kept, its unguided
    twin's parts, and per guided step i the relative size of each candidate's pushes. Values are the float32
    numbers of the run, exactly."""
    kappa, parts, twin, log = report["kappa"], report["parts"], report["twin"], report["log"]
    rows = slice(n * kappa, (n + 1) * kappa)
    record = dict(kept_candidate=int(report["best"][n]),
                  candidates={name: value[n].tolist() for name, value in parts.items()},
                  twin=({name: value[n].item() for name, value in twin.items()} if twin is not None else {}),
                  guidance_per_step={str(i): v[rows] for i, v in log.guidance.items()},
                  deviation_per_step={str(i): v[rows] for i, v in log.deviation.items()},
                  nan_fallbacks=sum(log.fallbacks[rows]))
    if log.gradient_cosine:
        record["grad_decoder_cosine_per_step"] = {str(i): v[rows] for i, v in log.gradient_cosine.items()}
    return record


def summarise_records(records, batch):
    """A stage's log.json from its image records (in image order: index, then class): means of the kept
    candidates' scores, of the rejected ones', of the unguided twins', which candidate was kept, and per guided
    step the mean relative push (||push|| / ||z_{t-1}||) of guidance and of deviation."""
    def mean(values):
        return float(torch.tensor(values).mean()) if values else None

    def merged(tables):  # [{key: values}] -> {key: all values, in order}
        out = {}
        for table in tables:
            for key, values in table.items():
                out.setdefault(key, []).extend(values if isinstance(values, list) else [values])
        return out

    def per_step(name):  # {step i: mean over every sample}, from the first step (49) down
        values = merged(r.get(name, {}) for r in records)
        return {i: mean(values[i]) for i in sorted(values, key=int, reverse=True)}

    kept = [{name: v[r["kept_candidate"]] for name, v in r["candidates"].items()} for r in records]
    rejected = [{name: [x for j, x in enumerate(v) if j != r["kept_candidate"]] for name, v in r["candidates"].items()}
                for r in records]
    tables = {name: {part: mean(values) for part, values in merged(rows).items()}
              for name, rows in (("kept", kept), ("rejected", rejected), ("twin", [r["twin"] for r in records]))}
    kept_candidate = [r["kept_candidate"] for r in records]
    kappa = max(kept_candidate) + 1 if kept_candidate else 0
    cosines = merged(r.get("grad_decoder_cosine_per_step", {}) for r in records)
    return dict(images_logged=len(records), **tables,
                kept_candidate_counts=[kept_candidate.count(k) for k in range(kappa)],
                relative_guidance_per_step=per_step("guidance_per_step"),
                relative_deviation_per_step=per_step("deviation_per_step"),
                nan_fallbacks=sum(r["nan_fallbacks"] for r in records), sampler_batch=batch,
                grad_decoder_cosine=mean([v for values in cosines.values() for v in values]),
                grad_decoder_cosine_per_step=per_step("grad_decoder_cosine_per_step"))


def log_line(k, summary):
    """The one line a stage prints: what guidance bought on the kept images, against its alternatives."""
    def fmt(table):
        if not table:
            return "-"
        return " ".join(f"{name} {value:.3f}" for name, value in table.items() if value is not None)
    guide = [v for v in summary["relative_guidance_per_step"].values() if v is not None]
    dev = [v for v in summary["relative_deviation_per_step"].values() if v is not None]
    return (f"stage {k}: kept [{fmt(summary['kept'])}] | rejected [{fmt(summary['rejected'])}] | unguided twin "
            f"[{fmt(summary['twin'])}] | kept candidate {summary['kept_candidate_counts']} | push/step: guidance "
            f"{sum(guide) / max(1, len(guide)):.4f}, deviation {sum(dev) / max(1, len(dev)):.4f}")
