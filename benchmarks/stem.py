"""The stem study: does the ConvNeXt stem matter once the encoder learns? (issue 9)

Usage:
    python benchmarks/stem.py --quick [--jobs 2] [--work /tmp/wsi-stem-bench]
    python benchmarks/stem.py --device cuda            # the full study on a GPU machine

On ``lc25000-lung`` (``WSI_TEST_TILES``; real H&E, 3 classes), split by ``group`` into
train / test (test groups never seen in training; stratified by class):

1. **From scratch.** ``convnext_atto`` with the ``patch``, ``overlap``, ``overlap_tiered`` and
   ``overlap_act`` stems, each trained with ``wsi_convnext.finetune.finetune_encoder`` with the
   same budget (steps × batch), augmentations and recipe, for ``--seeds`` seeds (the seed sets
   the initialisation, data order and augmentation; seed s is the same data order for every arm).
2. **From a trained patch checkpoint.** One patch-stem model trained from scratch (seed 1000,
   same budget) is fine-tuned under ``patch`` and under the exactly converted ``overlap`` stem
   (same function at the start), same seeds; this separates the architecture from the start.
3. Every model predicts the test tiles (``predict_tiles``); reported: test balanced accuracy
   and macro one-vs-rest AUC (mean ± sd over seeds), the paired difference against ``patch``
   (from-scratch arms) or against ``ft_patch`` (fine-tuned arms) with a 95% interval from a
   bootstrap over seeds and test groups (both resampled, pairs kept), training and inference
   throughput (tiles/s, as measured inside the runs), parameters and forward FLOPs per 224-px tile.

Training runs are independent processes (``--jobs`` at a time, ``--threads`` torch threads each).
Results: ``<work>/results.json`` and ``<work>/results.md``.

``--ssl`` (issue 18): the same question under self-supervised pretraining. Every stem is
pretrained with the default method (``wsi_convnext.pretrain``, DINO) on the training tiles
without their labels, same budget, ``--seeds`` seeds; plus the continued-pretraining pair (one
patch checkpoint, pretrained with seed 1000, continued as ``patch`` and as the exactly converted
``overlap``) and the random-init reference. Each encoder is probed (linear and cosine kNN, see
``wsi_convnext.pretrain.probe``) on the group-disjoint test part, beside the first-order
pixel-statistics baseline (lc25000's shortcut ceiling), and on the **permuted-block control**:
test tiles against the same tiles with their pixels permuted inside 2-, 4- and 8-px blocks
(identical histograms, so first-order statistics are at chance; a group-disjoint half of the
pairs fits the probe, the other half scores it). The control asks the stem question directly:
does a 4×4 stride-4 patchify lose structure finer than 4 px that an overlapping stem keeps?
Results: ``<work>/ssl/results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCRATCH_ARMS = ("patch", "overlap", "overlap_tiered", "overlap_act")
FT_ARMS = {"ft_patch": "patch", "ft_overlap": "overlap"}
PRETRAIN_SEED = 1000

# The CPU budget: 300 steps of 32 random 112-px crops (the tile presentations of the 200 × 48
# calibration run in issue 9), tested on 160-px centre crops (more context per tile, same µm/px).
QUICK = {"steps": 300, "batch_size": 32, "crop": 112, "eval_size": 160, "seeds": 3, "test_groups_per_class": 20,
         "ft_steps": 150, "lr": 2e-3, "ft_lr": 1e-3}  # fmt: skip
FULL = {"steps": 3000, "batch_size": 64, "crop": 160, "eval_size": 224, "seeds": 5, "test_groups_per_class": 0,
        "ft_steps": 1000, "lr": 2e-3, "ft_lr": 1e-3}  # fmt: skip


def make_split(tiles_dir: Path, work: Path, test_frac: float, test_groups_per_class: int, seed: int) -> tuple[Path, Path]:
    """Write train.csv (split=train) and test.csv; groups never on both sides."""
    from wsi_convnext._io import write_csv
    from wsi_convnext.data import csv_tiles, grouped_split

    tiles = csv_tiles(tiles_dir / "labels.csv")
    train_idx, test_idx, _ = grouped_split(tiles, val_frac=test_frac, seed=seed)
    if test_groups_per_class:
        rng = np.random.default_rng(seed)
        keep = []
        for c in range(len(tiles.classes)):
            groups = sorted({g for g, y in zip(tiles.groups[test_idx], tiles.y[test_idx]) if y == c})
            keep += list(rng.choice(groups, size=min(test_groups_per_class, len(groups)), replace=False))
        test_idx = test_idx[np.isin(tiles.groups[test_idx], keep)]
    assert not set(tiles.groups[train_idx]) & set(tiles.groups[test_idx])
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, idx in (("train", train_idx), ("test", test_idx)):
        rows = [[str(tiles_dir / tiles.refs[i]), tiles.classes[tiles.y[i]], tiles.groups[i], name] for i in idx]
        paths.append(write_csv(work / f"{name}.csv", ["path", "label", "group", "split"], rows))
    return paths[0], paths[1]


def run_arm(job: dict) -> dict:
    """Train one arm (in its own process) and predict the test tiles."""
    import torch

    torch.set_num_threads(job["threads"])
    from wsi_convnext.finetune import FinetuneConfig, finetune_encoder, predict_tiles

    t0 = time.perf_counter()
    cfg = FinetuneConfig(
        data=(job["train_csv"],), out=job["out"], model=job["model"], stem=job["stem"], weights=job.get("weights"),
        steps=job["steps"], batch_size=job["batch_size"], lr=job["lr"], crop_size=job["crop"],
        eval_size=job["eval_size"], val_frac=0.0, seed=job["seed"], device=job["device"], num_workers=job["workers"],
        threads=job["threads"], warmup=0.1, overwrite=True,
    )  # fmt: skip
    out = finetune_encoder(cfg)
    train_secs = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    pred = predict_tiles(out, job["test_csv"], batch_size=64, device=job["device"], num_workers=job["workers"],
                         out_csv=out / "test_predictions.csv", n_boot=0)  # fmt: skip
    return {
        "arm": job["arm"], "stem": job["stem"], "seed": job["seed"], "out": str(out),
        "balanced_accuracy": pred.metrics["balanced_accuracy"]["value"], "auc": pred.metrics["auc"]["value"],
        "train_tiles_per_second": metrics["train_tiles_per_second"], "infer_tiles_per_second": pred.tiles_per_second,
        "wall_seconds": time.perf_counter() - t0, "train_wall_seconds": train_secs,
        "y": pred.tiles.y.tolist(), "groups": pred.tiles.groups.tolist(), "probs": pred.probs.tolist(),
    }  # fmt: skip


def model_cost(model: str, stem: str) -> dict:
    """Parameters and forward FLOPs (multiply-add = 2) of one 224-px tile."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from wsi_convnext.encoders import build_encoder

    enc = build_encoder(model, stem=stem)
    params = sum(p.numel() for p in enc.model.parameters())
    stem_params = sum(p.numel() for p in enc.model.stem.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        enc.model(torch.zeros(1, 3, 224, 224))
    return {"params": params, "stem_params": stem_params, "gflops_224": fc.get_total_flops() / 1e9}


def measure_throughput(model: str, stems: list[str], *, batch: int, crop: int, eval_size: int, repeats: int,
                       threads: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """Interleaved train (forward + backward + AdamW step) and inference tiles/s per stem, best of ``repeats``.

    All stems are measured in the same time window, round-robin, so a changing machine load
    affects them alike (the per-run figures inside the arms do not have that property).
    """
    import torch

    from wsi_convnext.encoders import build_encoder

    torch.set_num_threads(threads)
    nets = {s: build_encoder(model, stem=s).model for s in stems}
    opts = {s: torch.optim.AdamW(n.parameters(), lr=1e-4) for s, n in nets.items()}
    best: dict[str, dict[str, float]] = {s: {"train": 0.0, "infer": 0.0} for s in stems}
    xt = torch.rand(batch, 3, crop, crop)
    xi = torch.rand(64, 3, eval_size, eval_size)
    for r in range(repeats + 1):  # the first round warms up
        for s, net in nets.items():
            net.train()
            t0 = time.perf_counter()
            net(xt).square().mean().backward()
            opts[s].step()
            opts[s].zero_grad()
            tr = batch / (time.perf_counter() - t0)
            net.eval()
            with torch.inference_mode():
                t0 = time.perf_counter()
                net(xi)
                inf = len(xi) / (time.perf_counter() - t0)
            if r:
                best[s]["train"] = max(best[s]["train"], tr)
                best[s]["infer"] = max(best[s]["infer"], inf)
    return best


def _metric(y: np.ndarray, p: np.ndarray, which: str) -> float:
    from wsi_convnext.labels.metrics import balanced_accuracy, roc_auc

    return balanced_accuracy(y, p) if which == "balanced_accuracy" else roc_auc(y, p)


def paired_difference(runs_a: list[dict], runs_b: list[dict], which: str, n_boot: int, seed: int) -> dict:
    """Mean over seeds of (a - b) with a 95% percentile interval, seeds and test groups resampled.

    Runs are paired by seed; all runs of both arms predicted the same test tiles.
    """
    by_seed_a = {r["seed"]: r for r in runs_a}
    by_seed_b = {r["seed"]: r for r in runs_b}
    seeds = sorted(set(by_seed_a) & set(by_seed_b))
    y = np.asarray(runs_a[0]["y"])
    groups = np.asarray(runs_a[0]["groups"])
    pa = {s: np.asarray(by_seed_a[s]["probs"]) for s in seeds}
    pb = {s: np.asarray(by_seed_b[s]["probs"]) for s in seeds}
    point = float(np.mean([_metric(y, pa[s], which) - _metric(y, pb[s], which) for s in seeds]))
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    members = {g: np.flatnonzero(groups == g) for g in uniq}
    g_class = {g: int(y[members[g][0]]) for g in uniq}
    by_class = {c: [g for g in uniq if g_class[g] == c] for c in set(g_class.values())}
    diffs = []
    for _ in range(n_boot):
        pick = np.concatenate([members[g] for c, gs in by_class.items() for g in rng.choice(gs, size=len(gs))])
        ss = rng.choice(seeds, size=len(seeds))
        diffs.append(np.mean([_metric(y[pick], pa[s][pick], which) - _metric(y[pick], pb[s][pick], which) for s in ss]))
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return {"mean": point, "ci_low": float(lo), "ci_high": float(hi), "n_seeds": len(seeds)}


def summarise(runs: list[dict], costs: dict, n_boot: int) -> dict:
    arms: dict[str, list[dict]] = {}
    for r in runs:
        arms.setdefault(r["arm"], []).append(r)
    out = {}
    for arm, rs in arms.items():
        base = "patch" if arm in SCRATCH_ARMS else "ft_patch"
        row = {"stem": rs[0]["stem"], "n_seeds": len(rs), "seeds": sorted(r["seed"] for r in rs)}
        for m in ("balanced_accuracy", "auc", "train_tiles_per_second", "infer_tiles_per_second"):
            v = np.array([r[m] for r in rs], dtype=float)
            row[m] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan")}
        if arm != base and base in arms:
            row["vs"] = base
            for m in ("balanced_accuracy", "auc"):
                row[f"diff_{m}"] = paired_difference(rs, arms[base], m, n_boot, seed=0)
        row.update(costs[rs[0]["stem"]])
        out[arm] = row
    return out


def table(summary: dict) -> str:
    def ms(e: dict, nd: int = 3) -> str:
        return f"{e['mean']:.{nd}f} ± {e['sd']:.{nd}f}"

    def tput(r: dict, kind: str) -> str:
        if "throughput" in r:  # interleaved measurement (see measure_throughput)
            return f"{r['throughput'][kind]:.1f}"
        return ms(r[f"{kind}_tiles_per_second"], 1)

    def diff(e: dict | None) -> str:
        return "—" if not e else f"{e['mean']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]"

    lines = [
        "| arm | stem | seeds | test bal. acc. | test macro AUC | Δ bal. acc. (95% CI) | Δ AUC (95% CI) | train tiles/s | infer tiles/s | params (stem) | GFLOPs/224 px |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, r in summary.items():
        lines.append(
            f"| {arm} | {r['stem']} | {r['n_seeds']} | {ms(r['balanced_accuracy'])} | {ms(r['auc'])} | "
            f"{diff(r.get('diff_balanced_accuracy'))} | {diff(r.get('diff_auc'))} | {tput(r, 'train')} | "
            f"{tput(r, 'infer')} | {r['params'] / 1e6:.3f} M ({r['stem_params'] / 1e3:.1f} k) | {r['gflops_224']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CPU budget (<= 40 min on 2 idle cores)")
    p.add_argument("--tiles", type=Path, default=Path(os.environ.get("WSI_TEST_TILES", ROOT.parent / "shared" / "tiles")) / "lc25000-lung")
    p.add_argument("--work", type=Path, default=Path("/tmp/wsi-stem-bench"))
    p.add_argument("--model", default="convnext_atto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per from-scratch run")
    p.add_argument("--ft-steps", type=int, default=None, help="optimiser steps per fine-tuning run")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--crop", type=int, default=None, help="training random-crop side (px, same µm/px)")
    p.add_argument("--eval-size", type=int, default=None, help="test centre-crop side (px)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate from scratch")
    p.add_argument("--ft-lr", type=float, default=None, help="peak learning rate when fine-tuning the patch checkpoint")
    p.add_argument("--test-frac", type=float, default=0.25, help="fraction of groups held out for test")
    p.add_argument("--test-groups-per-class", type=int, default=None, help="subsample test groups (0 = all)")
    p.add_argument("--arms", nargs="+", default=list(SCRATCH_ARMS) + list(FT_ARMS))
    p.add_argument("--jobs", type=int, default=2, help="training processes at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--workers", type=int, default=0, help="decoding worker processes per run")
    p.add_argument("--n-boot", type=int, default=500)
    p.add_argument("--throughput-repeats", type=int, default=5)
    p.add_argument("--throughput-only", action="store_true",
                   help="only (re)measure interleaved throughput and update <work>/results.{json,md}")  # fmt: skip
    p.add_argument("--ssl", action="store_true", help="the self-supervised arms (issue 18; see the module docstring)")
    p.add_argument("--probe-groups-per-class", type=int, default=None, help="--ssl: training groups per class the probes fit on (0 = all)")
    p.add_argument("--control-groups-per-class", type=int, default=None, help="--ssl: test groups per class of the permuted-block control")
    a = p.parse_args(argv)
    if a.ssl:
        if not (a.tiles / "labels.csv").is_file():
            print(f"lc25000-lung not found at {a.tiles}; set WSI_TEST_TILES", file=sys.stderr)
            return 2
        return ssl_main(a)
    base = dict(QUICK if a.quick or a.device == "cpu" else FULL)
    for k in ("seeds", "steps", "ft_steps", "batch_size", "crop", "eval_size", "lr", "ft_lr", "test_groups_per_class"):
        if getattr(a, k) is not None:
            base[k] = getattr(a, k)
    if a.throughput_only:
        doc = json.loads((a.work / "results.json").read_text())
        add_throughput(doc, a, base)
        return 0
    if not (a.tiles / "labels.csv").is_file():
        print(f"lc25000-lung not found at {a.tiles}; set WSI_TEST_TILES", file=sys.stderr)
        return 2
    t_start = time.time()
    load_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    train_csv, test_csv = make_split(a.tiles, a.work, a.test_frac, base["test_groups_per_class"], seed=0)
    common = {"train_csv": str(train_csv), "test_csv": str(test_csv), "model": a.model, "batch_size": base["batch_size"],
              "crop": base["crop"], "eval_size": base["eval_size"], "lr": base["lr"], "device": a.device,
              "threads": a.threads, "workers": a.workers}  # fmt: skip
    seeds = list(range(base["seeds"]))
    jobs = [dict(common, arm=s, stem=s, seed=k, steps=base["steps"], out=str(a.work / "runs" / f"{s}-s{k}"))
            for k in seeds for s in SCRATCH_ARMS if s in a.arms]  # fmt: skip
    want_ft = [arm for arm in FT_ARMS if arm in a.arms]
    pre_job = dict(common, arm="pretrain_patch", stem="patch", seed=PRETRAIN_SEED, steps=base["steps"],
                   out=str(a.work / "runs" / "pretrain-patch"))  # fmt: skip
    runs: list[dict] = []
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = []
        pre = pool.submit(run_arm, pre_job) if want_ft else None
        futures += [pool.submit(run_arm, j) for j in jobs]
        if pre is not None:
            pre_res = pre.result()
            print(f"pretrain patch: bal.acc {pre_res['balanced_accuracy']:.3f} auc {pre_res['auc']:.3f}", flush=True)
            weights = str(Path(pre_res["out"]) / "encoder.safetensors")
            futures += [pool.submit(run_arm, dict(common, arm=arm, stem=FT_ARMS[arm], seed=k, steps=base["ft_steps"],
                                                  lr=base["ft_lr"], weights=weights, out=str(a.work / "runs" / f"{arm}-s{k}")))
                        for k in seeds for arm in want_ft]  # fmt: skip
        for f in futures:
            r = f.result()
            runs.append(r)
            print(f"{r['arm']:>15} seed {r['seed']}: bal.acc {r['balanced_accuracy']:.3f} auc {r['auc']:.3f} "
                  f"({r['wall_seconds']:.0f} s)", flush=True)  # fmt: skip
    costs = {s: model_cost(a.model, s) for s in sorted({r["stem"] for r in runs})}
    summary = summarise(runs, costs, a.n_boot)
    doc = {
        "budget": base, "model": a.model, "device": a.device, "jobs": a.jobs, "threads": a.threads,
        "wall_minutes": (time.time() - t_start) / 60, "loadavg_before": load_before,
        "loadavg_after": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus", "n_train_csv": str(train_csv),
        "summary": summary, "runs": [{k: v for k, v in r.items() if k not in ("y", "groups", "probs")} for r in runs],
    }  # fmt: skip
    print(f"wall {doc['wall_minutes']:.1f} min; load {load_before} -> {doc['loadavg_after']}")
    add_throughput(doc, a, base)
    return 0


# ------------------------------------------------------------------------------------- --ssl

# --quick: designed for <= 60 min on 2 idle cores (2 jobs × 1 thread; 19 pretraining runs + probes).
QUICK_SSL = {"steps": 120, "batch_size": 32, "global_size": 64, "local_size": 32, "n_local": 2, "lr": 5e-4, "seeds": 3,
             "ft_steps": 60, "eval_size": 128, "probe_groups_per_class": 12, "test_groups_per_class": 8,
             "control_groups_per_class": 4}  # fmt: skip
# --device cuda: designed for <= 8 min of one H100/H200 (runs one after another on the GPU).
CUDA_SSL = {"steps": 300, "batch_size": 128, "global_size": 96, "local_size": 48, "n_local": 4, "lr": 1e-3, "seeds": 3,
            "ft_steps": 150, "eval_size": 224, "probe_groups_per_class": 0, "test_groups_per_class": 0,
            "control_groups_per_class": 20}  # fmt: skip
CONTROL_BLOCKS = (2, 4, 8)


def permute_blocks(img: np.ndarray, block: int, rng: np.random.Generator) -> np.ndarray:
    """``img`` (H, W, 3) with the pixels of every ``block`` × ``block`` block randomly permuted (same histogram)."""
    h, w = (img.shape[0] // block) * block, (img.shape[1] // block) * block
    x = img[:h, :w].reshape(h // block, block, w // block, block, 3).transpose(0, 2, 1, 3, 4).reshape(h // block, w // block, block * block, 3)
    order = np.argsort(rng.random(x.shape[:3]), axis=-1)
    x = np.take_along_axis(x, order[..., None], axis=2)
    return x.reshape(h // block, w // block, block, block, 3).transpose(0, 2, 1, 3, 4).reshape(h, w, 3)


def _subsample(csv_path: Path, groups_per_class: int, out: Path, seed: int) -> Path:
    """A CSV of the tiles of ``groups_per_class`` random groups per class (0 = all)."""
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if groups_per_class:
        rng = np.random.default_rng(seed)
        keep: set[str] = set()
        for lab in sorted({r["label"] for r in rows}):
            gs = sorted({r["group"] for r in rows if r["label"] == lab})
            keep |= set(rng.choice(gs, size=min(groups_per_class, len(gs)), replace=False).tolist())
        rows = [r for r in rows if r["group"] in keep]
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "group"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return out


def make_controls(test_csv: Path, work: Path, groups_per_class: int) -> dict[int, str]:
    """Per block size, a CSV of test tiles (``original``) and the same tiles block-permuted (``permuted``)."""
    from PIL import Image

    src = _subsample(test_csv, groups_per_class, work / "control-source.csv", seed=7)
    with open(src, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = {}
    for b in CONTROL_BLOCKS:
        folder = work / f"control-b{b}"
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, r in enumerate(rows):
            img = np.asarray(Image.open(r["path"]).convert("RGB"))
            dest = folder / f"{i:05d}-permuted.png"
            if not dest.exists():
                Image.fromarray(permute_blocks(img, b, np.random.default_rng([b, i]))).save(dest)
            lines += [(r["path"], "original", r["group"]), (str(dest), "permuted", r["group"])]
        p = work / f"control-b{b}.csv"
        with open(p, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "group"])
            w.writerows(lines)
        out[b] = str(p)
    return out


def run_ssl_arm(job: dict) -> dict:
    """Pretrain one arm (``steps`` 0: the random init) in its own process, then probe it."""
    import torch

    torch.set_num_threads(job["threads"])
    from wsi_convnext.data import load_labelled_tiles
    from wsi_convnext.encoders import build_encoder
    from wsi_convnext.mil.metrics import balanced_accuracy
    from wsi_convnext.pretrain import PretrainConfig, pretrain_encoder
    from wsi_convnext.pretrain.probe import embed_tiles, fit_probes, probe_probabilities

    t0 = time.perf_counter()
    tput = None
    if job["steps"]:
        cfg = PretrainConfig(
            data=(job["train_csv"],), out=job["out"], model=job["model"], stem=job["stem"], init=job.get("init", "random"),
            steps=job["steps"], batch_size=job["batch_size"], lr=job["lr"], global_size=job["global_size"],
            local_size=job["local_size"], n_local=job["n_local"], seed=job["seed"], device=job["device"],
            num_workers=job["workers"], threads=job["threads"], overwrite=True,
        )  # fmt: skip
        out = pretrain_encoder(cfg)
        tput = json.loads((out / "metrics.json").read_text())["train_tiles_per_second"]
        enc = build_encoder(job["model"], weights=out)
    else:
        enc = build_encoder(job["model"], stem=job["stem"])
    train_secs = time.perf_counter() - t0
    dev = torch.device(job["device"])
    enc.to(dev)
    probe_train = load_labelled_tiles(job["probe_csv"])
    test = load_labelled_tiles(job["test_csv"], classes=probe_train.classes)
    size = job["eval_size"]
    ftr, itr, _ = embed_tiles(enc.model, enc, probe_train, size=size, device=dev)
    t1 = time.perf_counter()
    fte, ite, _ = embed_tiles(enc.model, enc, test, size=size, device=dev)
    infer = len(ite) / (time.perf_counter() - t1)
    ytr, yte = probe_train.y[itr], test.y[ite]
    probs = probe_probabilities(ftr, ytr, fte, len(probe_train.classes), seed=0)
    res = {
        "arm": job["arm"], "stem": job["stem"], "seed": job["seed"], "out": job["out"],
        "balanced_accuracy": balanced_accuracy(yte, probs["linear"]), "knn_balanced_accuracy": balanced_accuracy(yte, probs["knn"]),
        "train_tiles_per_second": tput, "infer_tiles_per_second": infer, "train_wall_seconds": train_secs,
        "y": yte.tolist(), "groups": test.groups[ite].tolist(), "probs": probs["linear"].tolist(),
    }  # fmt: skip
    for b, path in job["controls"].items():
        ctl = fit_probes(enc.model, enc, load_labelled_tiles(path), device=dev, n_boot=0, test_frac=0.5, seed=0)
        res[f"control_b{b}"] = ctl["linear"]["balanced_accuracy"]
        res[f"control_b{b}_knn"] = ctl["knn"]["balanced_accuracy"]
    res["wall_seconds"] = time.perf_counter() - t0
    return res


def _pixel_baseline(probe_csv: str, test_csv: str, controls: dict[int, str], size: int) -> dict:
    """The first-order pixel-statistics baseline on the test part and on every control (linear probe)."""
    from wsi_convnext.data import load_labelled_tiles
    from wsi_convnext.encoders import build_encoder
    from wsi_convnext.pretrain.probe import fit_probes

    enc = build_encoder("convnext_atto")  # only its preprocessing runs; the features are not used
    out = {}
    tiles, test = load_labelled_tiles(probe_csv), None
    test = load_labelled_tiles(test_csv, classes=tiles.classes)
    out["test"] = fit_probes(enc.model, enc, tiles, test=test, n_boot=0, baseline=True)["baseline"]["balanced_accuracy"]
    for b, path in controls.items():
        out[f"control_b{b}"] = fit_probes(enc.model, enc, load_labelled_tiles(path), n_boot=0, test_frac=0.5,
                                          baseline=True)["baseline"]["balanced_accuracy"]  # fmt: skip
    return out


def ssl_main(a: argparse.Namespace) -> int:
    base = dict(QUICK_SSL if a.quick or a.device == "cpu" else CUDA_SSL)
    for k in ("seeds", "steps", "ft_steps", "batch_size", "lr", "eval_size", "test_groups_per_class", "probe_groups_per_class",
              "control_groups_per_class"):
        if getattr(a, k, None) is not None:
            base[k] = getattr(a, k)
    work = a.work / "ssl"
    t_start = time.time()
    load_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    train_csv, test_full = make_split(a.tiles, work, a.test_frac, 0, seed=0)
    test_csv = _subsample(test_full, base["test_groups_per_class"], work / "test-sub.csv", seed=1)
    probe_csv = _subsample(train_csv, base["probe_groups_per_class"], work / "probe-train.csv", seed=2)
    controls = make_controls(test_full, work, base["control_groups_per_class"])
    common = {"train_csv": str(train_csv), "test_csv": str(test_csv), "probe_csv": str(probe_csv), "controls": controls,
              "model": a.model, "device": a.device, "threads": a.threads, "workers": a.workers,
              **{k: base[k] for k in ("batch_size", "global_size", "local_size", "n_local", "lr", "eval_size")}}  # fmt: skip
    seeds = list(range(base["seeds"]))
    jobs = [dict(common, arm=f"ssl_{s}", stem=s, seed=k, steps=base["steps"], out=str(work / "runs" / f"{s}-s{k}"))
            for k in seeds for s in SCRATCH_ARMS if s in a.arms]  # fmt: skip
    jobs += [dict(common, arm="random_patch", stem="patch", seed=0, steps=0, out="")]
    pre_job = dict(common, arm="ssl_pretrain_patch", stem="patch", seed=PRETRAIN_SEED, steps=base["steps"],
                   out=str(work / "runs" / "pretrain-patch"))  # fmt: skip
    runs: list[dict] = []
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=mp.get_context("spawn")) as pool:
        pre = pool.submit(run_ssl_arm, pre_job)
        futures = [pool.submit(run_ssl_arm, j) for j in jobs]
        pre_res = pre.result()
        futures += [pool.submit(run_ssl_arm, dict(common, arm=f"ssl_{arm}", stem=FT_ARMS[arm], seed=k, steps=base["ft_steps"],
                                                  init=pre_res["out"], out=str(work / "runs" / f"{arm}-s{k}")))
                    for k in seeds for arm in FT_ARMS]  # fmt: skip
        baseline = _pixel_baseline(str(probe_csv), str(test_csv), controls, base["eval_size"])
        for f in futures:
            r = f.result()
            runs.append(r)
            print(f"{r['arm']:>18} seed {r['seed']}: linear {r['balanced_accuracy']:.3f} kNN {r['knn_balanced_accuracy']:.3f} "
                  + " ".join(f"b{b} {r[f'control_b{b}']:.3f}" for b in CONTROL_BLOCKS) + f" ({r['wall_seconds']:.0f} s)", flush=True)
    costs = {s: model_cost(a.model, s) for s in sorted({r["stem"] for r in runs})}
    arms: dict[str, list[dict]] = {}
    for r in runs:
        arms.setdefault(r["arm"], []).append(r)
    summary = {}
    for arm, rs in arms.items():
        ref = "ssl_patch" if arm in {f"ssl_{s}" for s in SCRATCH_ARMS} else "ssl_ft_patch" if arm.startswith("ssl_ft") else None
        row = {"stem": rs[0]["stem"], "n_seeds": len(rs), **costs[rs[0]["stem"]]}
        keys = ["balanced_accuracy", "knn_balanced_accuracy", "train_tiles_per_second", "infer_tiles_per_second"]
        for m in keys + [f"control_b{b}" for b in CONTROL_BLOCKS]:
            v = np.array([np.nan if r[m] is None else r[m] for r in rs], dtype=float)
            row[m] = {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")}
        if ref and arm != ref and ref in arms:
            row["vs"] = ref
            row["diff_balanced_accuracy"] = paired_difference(rs, arms[ref], "balanced_accuracy", a.n_boot, seed=0)
        summary[arm] = row
    doc = {"budget": base, "model": a.model, "device": a.device, "jobs": a.jobs, "threads": a.threads,
           "wall_minutes": (time.time() - t_start) / 60, "loadavg_before": load_before,
           "loadavg_after": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
           "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus", "pixel_statistics_baseline": baseline,
           "summary": summary, "runs": [{k: v for k, v in r.items() if k not in ("y", "groups", "probs")} for r in runs]}  # fmt: skip
    md = ssl_table(summary, baseline)
    (work / "results.json").write_text(json.dumps(doc, indent=2))
    (work / "results.md").write_text(md + "\n")
    print(md)
    print(f"wall {doc['wall_minutes']:.1f} min; load {load_before} -> {doc['loadavg_after']}")
    return 0


def ssl_table(summary: dict, baseline: dict) -> str:
    def ms(e: dict, nd: int = 3) -> str:
        return "" if not np.isfinite(e["mean"]) else f"{e['mean']:.{nd}f}" + ("" if not np.isfinite(e["sd"]) else f" ± {e['sd']:.{nd}f}")

    def diff(e: dict | None) -> str:
        return "—" if not e else f"{e['mean']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]"

    blocks = " | ".join(f"control {b} px" for b in CONTROL_BLOCKS)
    lines = [f"| arm | stem | seeds | linear bal. acc. | kNN bal. acc. | Δ linear vs ref (95% CI) | {blocks} | train tiles/s | GFLOPs/224 px |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(CONTROL_BLOCKS) + "---:|---:|"]  # fmt: skip
    for arm, r in summary.items():
        ctl = " | ".join(ms(r[f"control_b{b}"]) for b in CONTROL_BLOCKS)
        lines.append(f"| {arm} | {r['stem']} | {r['n_seeds']} | {ms(r['balanced_accuracy'])} | {ms(r['knn_balanced_accuracy'])} | "
                     f"{diff(r.get('diff_balanced_accuracy'))} | {ctl} | {ms(r['train_tiles_per_second'], 1)} | {r['gflops_224']:.3f} |")  # fmt: skip
    ctl = " | ".join(f"{baseline[f'control_b{b}']:.3f}" for b in CONTROL_BLOCKS)
    lines.append(f"| first-order pixel statistics | — | — | {baseline['test']:.3f} | | | {ctl} | | |")
    return "\n".join(lines)


def add_throughput(doc: dict, a: argparse.Namespace, base: dict) -> None:
    """Measure interleaved throughput, put it into the summary, write results.json and results.md."""
    summary = doc["summary"]
    stems = sorted({r["stem"] for r in summary.values()})
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    tp = measure_throughput(doc.get("model", a.model), stems, batch=base["batch_size"], crop=base["crop"],
                            eval_size=base["eval_size"], repeats=a.throughput_repeats, threads=a.threads)  # fmt: skip
    for r in summary.values():
        r["throughput"] = tp[r["stem"]]
    doc["throughput"] = {"tiles_per_second": tp, "loadavg": load, "threads": a.threads,
                         "train_batch": base["batch_size"], "train_crop": base["crop"], "infer_size": base["eval_size"]}  # fmt: skip
    md = table(summary)
    (a.work / "results.json").write_text(json.dumps(doc, indent=2))
    (a.work / "results.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    raise SystemExit(main())
