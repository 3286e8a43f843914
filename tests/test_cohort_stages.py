"""The cohort stage registry: specs, plans, and a cohort-scope stage on a real Dask LocalCluster.

A toy cohort stage (``census``) is registered by the test: it runs once, after every slide's
per-slide stages, with the slides that succeeded, and is skipped on a rerun because its
output exists.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from wsi_convnext.cohort import (
    noop_stages,
    CohortProgress,
    StageSpec,
    get_stage,
    register_stage,
    registered_stages,
    run_cohort,
    stage_plan,
    unregister_stage,
)
from wsi_convnext.config import RunConfig, load_config
from wsi_convnext.errors import ConfigError
from wsi_convnext.inputs import SlideSpec

REPO = Path(__file__).resolve().parent.parent


# --- toy stages (module level: the workers import them) ------------------------------------


def _names(cfg: RunConfig) -> tuple[str, ...]:
    return tuple(s.name for s in stage_plan(cfg))


def flaky_tile(slide: SlideSpec, config: RunConfig, state: Mapping[str, Any]) -> dict[str, Any]:
    if slide.slide_id.startswith("bad"):
        raise RuntimeError(f"{slide.slide_id} is broken")
    return {"tiles": 10, "store": f"{slide.slide_id}.zarr"}


def census(slides: Sequence[SlideSpec], config: RunConfig, states: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Write OUT/census.json: the slides that reached the cohort stage, and count the calls."""
    out = Path(str(config.out))
    with (out / "census-calls.txt").open("a") as fh:
        fh.write("call\n")
    body = {"slides": [s.slide_id for s in slides], "stores": [states[s.slide_id].get("store") for s in slides]}
    (out / "census.json").write_text(json.dumps(body))
    return {"n": len(slides)}


def stamp(slide: SlideSpec, config: RunConfig, state: Mapping[str, Any]) -> dict[str, Any]:
    """A per-slide stage after the census: sees the census output and the slide's earlier state."""
    return {"tiles": state["n"], "stamped": f"{state['store']}:{state['n']}"}


def failing_census(slides: Sequence[SlideSpec], config: RunConfig, states: Mapping[str, Any]) -> dict[str, Any]:
    raise ValueError("the census broke")


def _census_outputs(config: RunConfig, slide: SlideSpec | None) -> tuple[Path, ...]:
    return (Path(str(config.out)) / "census.json",)


CENSUS = StageSpec("census", census, scope="cohort", outputs=_census_outputs, resume="outputs")


@pytest.fixture
def census_registered() -> Iterator[StageSpec]:
    register_stage(CENSUS)
    try:
        yield CENSUS
    finally:
        unregister_stage("census")


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster, set_as_default=False) as c:
            yield c


def _slides(n_good: int = 4, n_bad: int = 1) -> list[SlideSpec]:
    ids = [f"good{i}" for i in range(n_good)] + [f"bad{i}" for i in range(n_bad)]
    return [SlideSpec(Path(f"/nowhere/{i}.svs"), i) for i in ids]


def _cfg(out: Path, **overrides: Any) -> RunConfig:
    return load_config(None, {"slides": "/nowhere", "out": str(out), "report": False, **overrides})


# --- registry ------------------------------------------------------------------------------


def test_builtin_stages_and_plans() -> None:
    assert [s.name for s in registered_stages()][:6] == ["tile", "pretrain", "finetune", "embed", "predict", "mil"]
    assert {get_stage(n).scope for n in ("pretrain", "finetune", "mil")} == {"cohort"}
    assert get_stage("embed").resources_for(_cfg(Path("o"))) == "gpu"
    assert get_stage("embed").resources_for(_cfg(Path("o"), **{"embed.device": "cpu"})) == "cpu"
    assert get_stage("tile").resources_for(_cfg(Path("o"))) == "cpu"
    assert _names(_cfg(Path("o"))) == ("tile",)
    assert _names(_cfg(Path("o"), **{"embed.model": "convnext_atto"})) == ("tile", "embed")
    full = _cfg(Path("o"), **{"embed.model": "convnext_atto", "predict.model_dir": "m"})
    assert _names(full) == ("tile", "embed", "predict")
    with pytest.raises(ConfigError, match="unknown cohort stage 'tyle'"):
        get_stage("tyle")
    with pytest.raises(ConfigError, match="already registered"):
        register_stage(StageSpec("tile", flaky_tile))
    with pytest.raises(ConfigError, match="scope must be 'slide' or 'cohort'"):
        StageSpec("x", flaky_tile, scope="patient")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="resources must be 'cpu' or 'gpu'"):
        StageSpec("x", flaky_tile, resources="tpu")  # type: ignore[arg-type]


def test_the_plan_follows_registry_order(census_registered: StageSpec) -> None:
    late = StageSpec("qc-summary", flaky_tile)  # per slide, registered after the cohort stage: runs after it
    early = StageSpec("early", flaky_tile)
    register_stage(late)
    register_stage(early, before="embed")
    try:
        cfg = _cfg(Path("o"), **{"embed.model": "convnext_atto"})
        assert _names(cfg) == ("tile", "early", "embed", "census", "qc-summary")
        assert [s.name for s in stage_plan(cfg, {"embed": flaky_tile})] == list(_names(cfg))
        assert stage_plan(cfg, {"embed": flaky_tile})[2].fn is flaky_tile  # an override replaces the function only
        assert stage_plan(cfg, {"embed": flaky_tile})[2].resources_for(cfg) == "gpu"
        with pytest.raises(ConfigError, match="unknown cohort stage 'nope'"):
            register_stage(StageSpec("x", flaky_tile), before="nope")
    finally:
        unregister_stage("qc-summary")
        unregister_stage("early")


def test_driver_contains_no_stage_names() -> None:
    text = (REPO / "wsi_convnext" / "cohort" / "driver.py").read_text()
    code = re.sub(r'""".*?"""', "", text, flags=re.S)  # docstrings may mention examples
    for name in ("tile", "embed", "predict"):
        assert not re.search(rf"""["']{name}["']""", code), name


def test_only_the_cohort_package_imports_dask() -> None:
    pattern = re.compile(r"^\s*(from|import)\s+(dask|distributed|dask_jobqueue)\b", re.M)
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "wsi_convnext").rglob("*.py")
        if "cohort" not in p.relative_to(REPO / "wsi_convnext").parts and pattern.search(p.read_text())
    ]
    assert offenders == []


# --- a cohort-scope stage on a real cluster ------------------------------------------------


def test_cohort_stage_runs_once_after_the_slides(tmp_path: Path, client: Any, census_registered: StageSpec) -> None:
    events: list[CohortProgress] = []
    cfg = _cfg(tmp_path)
    slides = _slides()
    summary = run_cohort(cfg, client=client, slides=slides, stages={"tile": flaky_tile}, progress=events.append)
    assert summary.stages == ("tile", "census")
    assert (summary.done, summary.failed) == (4, 1)
    outcome = summary.cohort["census"]
    assert outcome.status == "done" and outcome.slide_id == "" and outcome.data == {"n": 4}
    body = json.loads((tmp_path / "census.json").read_text())
    assert body["slides"] == ["good0", "good1", "good2", "good3"]  # the slides that succeeded, in input order
    assert body["stores"] == [f"good{i}.zarr" for i in range(4)]  # with their per-slide states
    kinds = [e.event for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.index("cohort") > max(i for i, k in enumerate(kinds) if k == "slide")  # after every slide
    assert [e.stage for e in events if e.event == "cohort"] == ["census"]
    assert summary.exit_code == 1  # bad0 failed
    assert [(f.slide_id, f.stage) for f in summary.failures] == [("bad0", "tile")]

    # Rerun: the census output exists, so the stage is skipped without being called.
    again = run_cohort(cfg, client=client, slides=slides, stages={"tile": flaky_tile})
    assert again.cohort["census"].status == "skipped"
    assert (tmp_path / "census-calls.txt").read_text().count("call") == 1
    # --overwrite redoes it.
    forced = run_cohort(_cfg(tmp_path, overwrite=True), client=client, slides=slides, stages={"tile": flaky_tile})
    assert forced.cohort["census"].status == "done"
    assert (tmp_path / "census-calls.txt").read_text().count("call") == 2


def test_failed_cohort_stage_fails_the_run(tmp_path: Path, client: Any, census_registered: StageSpec) -> None:
    from dataclasses import replace

    summary = run_cohort(
        _cfg(tmp_path), client=client, slides=_slides(2, 0),
        stages={"tile": noop_stages()["tile"], "census": replace(CENSUS, fn=failing_census)},
    )  # fmt: skip
    assert summary.failed == 0 and not summary.ok and summary.exit_code == 1
    (row,) = summary.failures
    assert (row.slide_id, row.stage, row.error_type, row.error) == ("", "census", "ValueError", "the census broke")
    assert not (tmp_path / "census.json").exists()


def test_only_cohort_stages(tmp_path: Path, client: Any) -> None:
    """A plan of cohort stages alone (per-slide stage disabled) still runs them once."""
    from dataclasses import replace

    never = replace(get_stage("tile"), enabled=lambda config: False)
    summary = run_cohort(_cfg(tmp_path), client=client, slides=_slides(3, 0), stages={"tile": never, "census": CENSUS})
    assert summary.stages == ("census",) and summary.done == 3
    body = json.loads((tmp_path / "census.json").read_text())
    assert body == {"slides": ["good0", "good1", "good2"], "stores": [None, None, None]}
    assert summary.cohort["census"].status == "done" and summary.ok


def test_per_slide_stages_after_a_cohort_stage_see_its_outputs(tmp_path: Path, client: Any) -> None:
    """tile → census (cohort) → stamp (per slide): the stamp runs after the census, with its outputs."""
    stages = {"tile": flaky_tile, "census": replace(CENSUS, resume="stage"), "stamp": StageSpec("stamp", stamp)}
    events: list[CohortProgress] = []
    summary = run_cohort(_cfg(tmp_path), client=client, slides=_slides(3, 1), stages=stages, progress=events.append)
    assert summary.stages == ("tile", "census", "stamp")
    assert (summary.done, summary.failed) == (3, 1)
    rows = {(r.slide_id, r.stage): r for r in summary_rows(summary)}
    assert all(rows[(f"good{i}", "stamp")].tiles == 3 for i in range(3))  # census saw the 3 good slides
    assert ("bad0", "stamp") not in rows
    kinds = [e.event for e in events]
    good = [i for i, e in enumerate(events) if e.event == "slide" and e.status != "failed"]
    assert len(good) == 3 and kinds.index("cohort") < min(good)  # good slides finish after the census


def test_a_failed_cohort_stage_fails_the_slides_waiting_for_it(tmp_path: Path, client: Any) -> None:
    stages = {"tile": flaky_tile, "census": replace(CENSUS, fn=failing_census), "stamp": StageSpec("stamp", stamp)}
    summary = run_cohort(_cfg(tmp_path), client=client, slides=_slides(2, 1), stages=stages)
    assert (summary.done, summary.failed) == (0, 3) and summary.exit_code == 1
    assert ("", "census") in {(f.slide_id, f.stage) for f in summary.failures}


def summary_rows(summary: Any) -> list[Any]:
    from wsi_convnext.outputs.manifest import RunManifest

    return [r for r in RunManifest(summary.manifest).rows() if r.status != "running"]
