"""Self-supervised pretraining: outputs and the embed round trip, starting points and the exact
stem conversion, resume after SIGKILL, data sharding and views, and every bad-input case.

DDP (2 gloo processes) is in test_pretrain_dist.py; learning on real H&E is the slow test at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_data_labelled import _lc25000_stores, colour_folder, lc25000_sample  # noqa: E402

from wsi_convnext.cli import app  # noqa: E402
from wsi_convnext.errors import ConfigError, StoreExistsError  # noqa: E402
from wsi_convnext.pretrain import PretrainConfig, pretrain_encoder  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
# Small, fast runs: 1 torch thread, no worker processes, 48/32-px crops of 64-px tiles.
FAST = {"model": "convnext_atto", "batch_size": 8, "threads": 1, "num_workers": 0, "device": "cpu", "steps": 2,
        "global_size": 48, "local_size": 32, "n_local": 2}  # fmt: skip
FAST_ARGS = ["--batch-size", "8", "--threads", "1", "--num-workers", "0", "--device", "cpu", "--steps", "2",
             "--global-size", "48", "--local-size", "32", "--n-local", "2"]  # fmt: skip


def _data(tmp_path: Path, n: int = 8, size: int = 64) -> Path:
    data = tmp_path / "colour"
    if not data.exists():
        colour_folder(data, n=n, size=size)
    return data


def _run(tmp_path: Path, out: str, **kw: object) -> Path:
    return pretrain_encoder(PretrainConfig(data=(str(_data(tmp_path)),), out=str(tmp_path / out), **{**FAST, **kw}))


def _cli(*args: str) -> object:
    return runner.invoke(app, [*map(str, args)])


def _one_line_error(res: object, *needles: str) -> str:
    assert res.exit_code != 0, res.output
    err = res.stderr.strip() if hasattr(res, "stderr") else res.output.strip()
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1, err
    for n in needles:
        assert n in line[0], line[0]
    return line[0]


# ------------------------------------------------------------------------------ outputs, embed


@pytest.mark.parametrize(("method", "stem"), [("dino", "patch"), ("dino", "overlap"), ("simclr", "overlap")])
def test_outputs_and_embed_picks_up_the_stem(tmp_path: Path, method: str, stem: str) -> None:
    from safetensors import safe_open

    from wsi_convnext.encoders import build_encoder

    out = _run(tmp_path, "enc", method=method, stem=stem)
    for name in ("encoder.safetensors", "config.json", "metrics.json", "metrics.md", "curves.png"):
        assert (out / name).is_file(), name
    with safe_open(str(out / "encoder.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
        keys = list(fh.keys())
    assert meta["wsi_convnext.kind"] == "pretrained_encoder"
    assert (meta["wsi_convnext.model"], meta["wsi_convnext.stem"], meta["wsi_convnext.method"]) == ("convnext_atto", stem, method)
    assert len(meta["wsi_convnext.data_fingerprint"]) == 64
    assert not any("head" in k and "fc" in k for k in keys) and not any(k.startswith("teacher") for k in keys)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in metrics["history"]] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in metrics["history"])
    assert metrics["evaluations"][-1]["feature_rank"] > 1.5
    if method == "dino":
        assert metrics["history"][0]["teacher_entropy"] > 0
    assert not list(out.parent.glob(f".{out.name}.work"))
    enc = build_encoder("convnext_atto", weights=out)  # what `embed --weights ENC_DIR` does
    assert enc.stem.name == stem
    x = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    assert np.isfinite(enc(x).numpy()).all()


def test_cli_embed_takes_a_pretrain_output_and_its_stem(tmp_path: Path) -> None:
    from wsi_convnext.store import open_store

    out = _run(tmp_path, "enc", stem="overlap")
    stores, _labels = _lc25000_stores(tmp_path, groups_per_class=1, tiles_per_store=2)
    res = _cli("embed", *stores, "--model", "convnext_atto", "--weights", out, "--device", "cpu", "--batch-size", "4")
    assert res.exit_code == 0, res.output
    st = open_store(stores[0])
    attrs = st.feature_attrs(st.feature_keys[0])
    assert attrs["stem"] == "overlap" and attrs["weights_path"].endswith("encoder.safetensors")
    assert st.features(st.feature_keys[0]).shape == (2, 320)


def test_rerun_is_a_no_op_and_another_config_needs_overwrite(tmp_path: Path) -> None:
    out = _run(tmp_path, "enc")
    before = (out / "encoder.safetensors").stat().st_mtime_ns
    assert _run(tmp_path, "enc") == out and (out / "encoder.safetensors").stat().st_mtime_ns == before
    with pytest.raises(StoreExistsError, match="--overwrite"):
        _run(tmp_path, "enc", steps=3)
    assert _run(tmp_path, "enc", steps=3, overwrite=True) == out
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 3


def test_pretrain_on_real_stores_without_labels(tmp_path: Path) -> None:
    stores, _labels = _lc25000_stores(tmp_path, groups_per_class=1, tiles_per_store=4)
    out = pretrain_encoder(PretrainConfig(data=tuple(str(s) for s in stores), out=str(tmp_path / "enc"), **{**FAST, "steps": 1}))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["kind"] == "stores" and cfg["data"]["n_tiles"] == 12 and cfg["data"]["n_groups"] == 3


def test_cli_pretrain_then_probe(tmp_path: Path) -> None:
    data = _data(tmp_path)
    probe = colour_folder(tmp_path / "probe", n=10, size=64)
    res = _cli("pretrain", data, "--out", tmp_path / "enc", *FAST_ARGS, "--probe", probe, "--probe-every", "1")
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "enc" / "metrics.json").read_text())
    assert [e["step"] for e in metrics["evaluations"]] == [1, 2]
    assert all(0 <= e["probe"]["linear"]["balanced_accuracy"] <= 1 for e in metrics["evaluations"])
    assert metrics["selection"].startswith("best linear-probe") and metrics["selected_step"] in (1, 2)
    res = _cli("probe", tmp_path / "enc", probe, "--out", tmp_path / "p", "--baseline", "--n-boot", "50", "--device", "cpu")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert doc["encoder"]["stem"] == "patch" and doc["n_test_groups"] >= 2
    for part in ("linear", "knn", "baseline"):
        e = doc[part]["balanced_accuracy"]
        assert e["ci_low"] <= e["value"] <= e["ci_high"], (part, e)
    # red against blue is decided by first-order statistics alone: the baseline is (near) perfect
    assert doc["baseline"]["balanced_accuracy"]["value"] >= 0.9
    assert "first-order pixel statistics" in (tmp_path / "p" / "probe.md").read_text()


# ------------------------------------------------------------------ starting points, conversion


def _patch_checkpoint(path: Path) -> Path:
    """A stock (patch-stem, timm layout with classifier) convnext_atto checkpoint whose every part matters."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(1)
    sd = {k: v.clone() for k, v in timm.create_model("convnext_atto", num_classes=1000).state_dict().items()}
    gen = torch.Generator().manual_seed(2)
    for key, value in sd.items():
        if key.endswith("gamma"):
            sd[key] = torch.rand(value.shape, generator=gen) * 0.5 + 0.25
        elif key.startswith("stem.") and key != "stem.0.weight":
            sd[key] = value + 0.3 * torch.randn(value.shape, generator=gen)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def _first_loss(out: Path) -> float:
    return json.loads((out / "metrics.json").read_text())["history"][0]["loss"]


@pytest.mark.parametrize("route", ["weights", "pretrained"])
def test_patch_checkpoint_continued_as_overlap_has_the_same_first_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    ckpt = _patch_checkpoint(tmp_path / "w" / "atto.safetensors")
    if route == "pretrained":  # the tag's layout in a local Hugging Face cache (nothing is downloaded)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        repo = tmp_path / "hf" / "hub" / "models--timm--convnext_atto.d2_in1k"
        (repo / "snapshots" / "0123abcd").mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123abcd")
        (repo / "snapshots" / "0123abcd" / "model.safetensors").write_bytes(ckpt.read_bytes())
        init, model = "pretrained", "convnext_atto.d2_in1k"
    else:
        init, model = str(ckpt), "convnext_atto"
    patch = _run(tmp_path, "patch", init=init, model=model, stem="patch", steps=1)
    overlap = _run(tmp_path, "overlap", init=init, model=model, stem="overlap", steps=1)
    start = json.loads((overlap / "config.json").read_text())["start"]
    assert start["stem_converted"] is True
    assert _first_loss(overlap) == pytest.approx(_first_loss(patch), abs=1e-4)
    scratch = _run(tmp_path, "scratch", stem="overlap", steps=1)
    assert abs(_first_loss(scratch) - _first_loss(patch)) > 1e-3  # the comparison can fail


def test_init_from_an_enc_dir_continues_it(tmp_path: Path) -> None:
    first = _run(tmp_path, "first", stem="overlap")
    second = _run(tmp_path, "second", stem="overlap", init=str(first))
    start = json.loads((second / "config.json").read_text())["start"]
    assert start["kind"] == "finetune" and start["source_stem"] == "overlap" and start["stem_converted"] is False


# ------------------------------------------------------------------------------ data and views


def test_shards_are_disjoint_and_their_union_is_the_single_process_order() -> None:
    from wsi_convnext.pretrain.data import ShardSampler

    y = np.zeros(40, dtype=np.int64)
    groups = np.array([f"slide{i // 10}" for i in range(40)], dtype=object)
    kw = {"balance": "class_group", "seed": 3, "num_samples": 32}
    single = list(ShardSampler(y, groups, batch=8, **kw))
    parts = [list(ShardSampler(y, groups, batch=8, rank=r, world=2, **kw)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 16
    merged = [it for b in range(4) for r in range(2) for it in parts[r][b * 4 : (b + 1) * 4]]
    assert merged == single
    resumed = ShardSampler(y, groups, batch=8, rank=1, world=2, **kw)
    resumed.set_epoch(0, start=16)
    assert list(resumed) == parts[1][8:]


def test_sampling_is_balanced_over_slides() -> None:
    from wsi_convnext.pretrain.data import ShardSampler

    groups = np.array(["huge"] * 900 + ["small"] * 100, dtype=object)
    s = ShardSampler(np.zeros(1000, dtype=np.int64), groups, batch=10, balance="class_group", seed=0, num_samples=2000)
    drawn = groups[[i for i, _ in s]]
    assert 0.45 < float(np.mean(drawn == "small")) < 0.55


def test_views_depend_only_on_the_item_seed(tmp_path: Path) -> None:
    from wsi_convnext.pretrain.data import MultiCropDataset, load_unlabelled_tiles

    tiles = load_unlabelled_tiles([str(_data(tmp_path))])
    ds = MultiCropDataset(tiles, global_size=48, local_size=32, n_local=3)
    g1, l1, _, err = ds[(2, 1234)]
    g2, l2, _, _ = ds[(2, 1234)]
    g3, _, _, _ = ds[(2, 1235)]
    assert err == "" and g1.shape == (2, 48, 48, 3) and l1.shape == (3, 32, 32, 3) and g1.dtype == np.uint8
    assert np.array_equal(g1, g2) and np.array_equal(l1, l2) and not np.array_equal(g1, g3)


def test_labels_of_a_csv_are_ignored(tmp_path: Path) -> None:
    from wsi_convnext.pretrain.data import load_unlabelled_tiles

    tiles = load_unlabelled_tiles([str(lc25000_sample(tmp_path / "s.csv", 1))])
    assert tiles.classes == ("unlabelled",) and set(tiles.y.tolist()) == {0} and len(set(tiles.groups.tolist())) == 3


@pytest.mark.parametrize(("entropy", "rank", "what"), [(0.01, None, "teacher"), (6.92, None, "teacher"), (None, 1.2, "feature")])
def test_collapse_is_reported_and_stops_when_asked(caplog: pytest.LogCaptureFixture, entropy: float | None, rank: float | None, what: str) -> None:
    import logging

    from wsi_convnext.pretrain.train import CollapseError, _check_collapse

    state = {"step": 50, "total_steps": 100, "collapse": []}
    with caplog.at_level(logging.WARNING):
        _check_collapse(PretrainConfig(data=("x",), out="y"), state, entropy, rank)
    assert state["collapse"][0]["what"] == what and "collapse at step 50" in caplog.text
    with pytest.raises(CollapseError, match="collapse at step 50"):
        _check_collapse(PretrainConfig(data=("x",), out="y", on_collapse="stop"), state, entropy, rank)
    healthy = {"step": 50, "total_steps": 100, "collapse": []}
    _check_collapse(PretrainConfig(data=("x",), out="y"), healthy, 4.0, 30.0)
    assert healthy["collapse"] == []


# ------------------------------------------------------------------------------------- resume


_SCRIPT = """
import sys
from wsi_convnext.pretrain import PretrainConfig, pretrain_encoder
cfg = PretrainConfig(data=(sys.argv[1],), out=sys.argv[2], model="convnext_atto", batch_size=8, threads=1, num_workers=0,
                     device="cpu", steps=6, global_size=48, local_size=32, n_local=2, checkpoint_every=1)
pretrain_encoder(cfg)
"""


def test_resume_after_sigkill_is_bit_identical(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data = _data(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-c", _SCRIPT, str(data), str(ref)], env=env, check=True, timeout=600)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(data), str(out)], env=env)
    ckpt = tmp_path / ".killed.work" / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and ckpt.stat().st_size > 0:
            time.sleep(0.5)
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and ckpt.is_file()
    subprocess.run([sys.executable, "-c", _SCRIPT, str(data), str(out)], env=env, check=True, timeout=600)
    a, b = load_file(str(ref / "encoder.safetensors")), load_file(str(out / "encoder.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    ha = json.loads((ref / "metrics.json").read_text())["history"]
    hb = json.loads((out / "metrics.json").read_text())["history"]
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]


# ---------------------------------------------------------------------------------- bad input


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "empty" / "a").mkdir(parents=True)
    _one_line_error(_cli("pretrain", tmp_path / "empty", "--out", tmp_path / "enc", *FAST_ARGS), str(tmp_path / "empty"), "no image files")
    assert not (tmp_path / "enc").exists()


def test_fewer_tiles_than_one_batch(tmp_path: Path) -> None:
    data = colour_folder(tmp_path / "few", n=2, size=64)
    _one_line_error(_cli("pretrain", data, "--out", tmp_path / "enc", *FAST_ARGS), str(data), "fewer than one batch")
    assert not (tmp_path / "enc").exists()


def test_tiles_smaller_than_the_global_crop(tmp_path: Path) -> None:
    data = colour_folder(tmp_path / "small", n=8, size=40)
    _one_line_error(_cli("pretrain", data, "--out", tmp_path / "enc", *FAST_ARGS), str(data), "blue00.png", "--global-size")
    assert not (tmp_path / "enc").exists()


def test_corrupt_file_is_skipped_and_counted_or_an_error_with_strict(tmp_path: Path) -> None:
    data = _data(tmp_path)
    (data / "red" / "broken.png").write_bytes(b"not a png")
    _one_line_error(_cli("pretrain", data, "--out", tmp_path / "strict", *FAST_ARGS, "--strict"), "broken.png", "--strict")
    assert not (tmp_path / "strict").exists()
    res = _cli("pretrain", data, "--out", tmp_path / "enc", *FAST_ARGS)
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "enc" / "metrics.json").read_text())
    assert metrics["n_skipped"] == 1 and "broken.png" in metrics["skipped"][0]["tile"]


def test_resuming_with_another_configuration_needs_overwrite(tmp_path: Path) -> None:
    import torch

    data = _data(tmp_path)
    work = tmp_path / ".enc.work"
    work.mkdir()
    torch.save({"fingerprint": "another run"}, work / "checkpoint.pt")
    _one_line_error(_cli("pretrain", data, "--out", tmp_path / "enc", *FAST_ARGS), str(work), "--overwrite")
    assert not (tmp_path / "enc").exists()
    assert _cli("pretrain", data, "--out", tmp_path / "enc", *FAST_ARGS, "--overwrite").exit_code == 0


def test_probe_set_overlapping_the_data_is_refused(tmp_path: Path) -> None:
    data = _data(tmp_path)
    _one_line_error(_cli("pretrain", data, "--out", tmp_path / "enc", *FAST_ARGS, "--probe", data), "overlaps the pretraining data")
    assert not (tmp_path / "enc").exists()


def test_unknown_method(tmp_path: Path) -> None:
    _one_line_error(_cli("pretrain", _data(tmp_path), "--out", tmp_path / "enc", *FAST_ARGS, "--method", "byol"), "--method", "dino")
    with pytest.raises(ConfigError, match="method"):
        PretrainConfig(data=("x",), out="y", method="byol")


def test_weights_for_another_model(tmp_path: Path) -> None:
    from wsi_convnext.encoders import build_encoder
    from wsi_convnext.encoders.weights import save_encoder_weights

    w = tmp_path / "femto.safetensors"
    save_encoder_weights(build_encoder("convnext_femto"), w)
    _one_line_error(_cli("pretrain", _data(tmp_path), "--out", tmp_path / "enc", *FAST_ARGS, "--init", w), "femto.safetensors", "convnext_femto")
    assert not (tmp_path / "enc").exists()


def test_cuda_requested_but_absent(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    args = [a for a in FAST_ARGS if a != "cpu"]
    args[args.index("--device") + 1 : args.index("--device") + 1] = ["cuda"]
    _one_line_error(_cli("pretrain", _data(tmp_path), "--out", tmp_path / "enc", *args), "cuda")
    assert not (tmp_path / "enc").exists()


def test_world_size_that_does_not_divide_the_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    _one_line_error(_cli("pretrain", _data(tmp_path), "--out", tmp_path / "enc", *FAST_ARGS), "--batch-size 8", "world size 3")
    assert not (tmp_path / "enc").exists()


def test_probe_random_needs_a_model(tmp_path: Path) -> None:
    _one_line_error(_cli("probe", "random", _data(tmp_path), "--out", tmp_path / "p"), "--model")


# ----------------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_pretraining_learns_on_real_he_tiles(tmp_path: Path) -> None:
    """Probe on held-out lc25000 groups: on each of 3 seeds, a short SimCLR run (120 steps × 32, no
    colour jitter, ~20 s each on 2 cores) beats its own starting point (the same architecture's
    random init under that seed) under the same linear probe, and by 0.02 on average.

    Measured (2026-12-05, this probe set): start → pretrained 0.782 → 0.826, 0.804 → 0.826,
    0.765 → 0.826 (mean gain 0.042). The default DINO does not learn at this budget: 30 steps gave
    +0.021, -0.110 and 0.000 on seeds 0-2, and 120 steps -0.122 on seed 1, so one 30-step DINO
    seed (what this test did before) passed by chance; DINO's gain needs a GPU budget. Every SimCLR
    seed lands on the same 0.826 (240 steps too), which looks like the first-order colour shortcut
    of this data set (README) rather than morphology: the test shows that pretraining moves the
    features towards what the probe can use, not that it learns structure.
    """
    from wsi_convnext.encoders.weights import save_encoder_weights
    from wsi_convnext.pretrain.probe import run_probe
    from wsi_convnext.pretrain.train import _start_encoder

    train = lc25000_sample(tmp_path / "train.csv", 6)
    probe = lc25000_sample(tmp_path / "probe.csv", 8, offset=10)
    kw = {"device": "cpu", "n_boot": 0, "seed": 0}
    gains = []
    for seed in range(3):
        cfg = PretrainConfig(
            data=(str(train),), out=str(tmp_path / f"enc{seed}"), model="convnext_atto", method="simclr", batch_size=32,
            steps=120, lr=1e-3, global_size=64, local_size=32, hed_sigma=0.0, brightness_contrast=0.0, threads=2,
            num_workers=1, device="cpu", seed=seed,
        )  # fmt: skip
        start, _ = _start_encoder(cfg)
        save_encoder_weights(start, tmp_path / f"start{seed}.safetensors")
        out = pretrain_encoder(cfg)
        after = run_probe(str(out), [str(probe)], out=tmp_path / f"p1-{seed}", **kw).doc["linear"]["balanced_accuracy"]
        before = run_probe(str(tmp_path / f"start{seed}.safetensors"), [str(probe)], out=tmp_path / f"p0-{seed}", **kw).doc
        before = before["linear"]["balanced_accuracy"]
        print(f"seed {seed}: linear-probe balanced accuracy on held-out groups {before:.3f} -> {after:.3f}")
        assert after > before, f"seed {seed}: pretrained {after:.3f} does not beat its start {before:.3f}"
        gains.append(after - before)
    assert np.mean(gains) >= 0.02, f"mean gain {np.mean(gains):.3f} < 0.02 (gains {gains})"


def test_a_flat_folder_of_unlabelled_tiles_is_data(tmp_path: Path) -> None:
    """Pretraining takes a plain folder of tiles (no class sub-folders): its usual unlabelled input."""
    from PIL import Image

    from wsi_convnext.pretrain.data import load_unlabelled_tiles

    rng = np.random.default_rng(0)
    folder = tmp_path / "tiles"
    (folder / "more").mkdir(parents=True)
    for name in ("a.png", "b.png", "more/c.png"):
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not a tile\n")
    tiles = load_unlabelled_tiles([str(folder)])
    assert sorted(Path(p).name for p in tiles.paths.tolist()) == ["a.png", "b.png", "c.png"]
    assert tiles.classes == ("unlabelled",) and set(tiles.y.tolist()) == {0}
