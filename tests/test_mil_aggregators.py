"""Aggregator registry, output contract, and learning a synthetic MIL task (every aggregator)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_convnext.errors import ConfigError
from wsi_convnext.mil.aggregators import (
    AGGREGATORS,
    Aggregator,
    AggregatorOutput,
    aggregator_defaults,
    build_aggregator,
    register_aggregator,
)
from wsi_convnext.mil.data import labels_for_bags
from wsi_convnext.labels.metrics import roc_auc
from wsi_convnext.mil.model import TrainedModel
from wsi_convnext.mil.synthetic import make_synthetic_cohort
from wsi_convnext.mil.training import TrainConfig, fit


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny bags: one thread is faster and steadier on a shared 2-core machine.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def test_registry_has_required_aggregators() -> None:
    assert {"mean", "abmil", "dsmil", "maxpool", "clam_sb"} <= set(AGGREGATORS)
    assert AGGREGATORS["dsmil"].instance_level and AGGREGATORS["maxpool"].instance_level
    assert aggregator_defaults("abmil")["hidden_dim"] == 128


def test_build_errors() -> None:
    with pytest.raises(ConfigError, match="unknown aggregator 'transmil'.*abmil"):
        build_aggregator("transmil", 8, 2)
    with pytest.raises(ConfigError, match="no option.*hiden_dim.*valid:.*hidden_dim"):
        build_aggregator("abmil", 8, 2, hiden_dim=3)
    with pytest.raises(ConfigError, match="n_classes must be >= 2"):
        build_aggregator("mean", 8, 1)
    # None never overrides a default.
    agg = build_aggregator("abmil", 8, 2, hidden_dim=None)
    assert agg.project[0].out_features == 128


def test_register_new_aggregator_is_one_decorated_class() -> None:
    @register_aggregator("test_first_tile")
    class FirstTile(Aggregator):
        def __init__(self, in_dim: int, n_classes: int, scale: float = 1.0) -> None:
            super().__init__(in_dim, n_classes)
            self.fc = torch.nn.Linear(in_dim, self.n_out)
            self.scale = scale

        def forward(self, x: torch.Tensor, target: int | None = None) -> AggregatorOutput:
            z = self.fc(x[0]) * self.scale
            scores = torch.zeros(x.shape[0])
            scores[0] = 1
            return AggregatorOutput(self.to_logits(z), scores)

    try:
        agg = build_aggregator("test_first_tile", 4, 3, scale=2.0)
        out = agg(torch.randn(5, 4))
        assert out.logits.shape == (3,) and aggregator_defaults("test_first_tile") == {"scale": 1.0}
        with pytest.raises(ConfigError, match="already registered"):
            register_aggregator("test_first_tile")(type("Other", (Aggregator,), {}))
    finally:
        AGGREGATORS.unregister("test_first_tile")


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_output_contract(name: str, n_classes: int) -> None:
    torch.manual_seed(0)
    agg = build_aggregator(name, 16, n_classes)
    x = torch.randn(37, 16)
    agg.train()
    out = agg(x, target=1)
    assert out.logits.shape == (n_classes,) and out.tile_scores.shape == (37,)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.tile_scores).all()
    if out.class_tile_scores is not None:
        assert out.class_tile_scores.shape[0] == 37
    if agg.score_kind == "attention":
        assert out.tile_scores.sum().item() == pytest.approx(1.0, abs=1e-5)
    loss = torch.nn.functional.cross_entropy(out.logits[None], torch.tensor([1]))
    if out.aux_loss is not None:
        assert out.aux_loss.ndim == 0
        loss = loss + out.aux_loss
    loss.backward()
    grads = [p.grad for p in agg.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    agg.eval()
    with torch.no_grad():
        assert agg(x).aux_loss is None  # no target, no auxiliary loss
        single = agg(x[:1])  # one-tile bags work
    assert single.logits.shape == (n_classes,)
    if n_classes == 2:  # binary: logits (0, z)
        assert single.logits[0].item() == 0.0


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_learns_synthetic_mil_task(name: str) -> None:
    """Positive bags hold 3–5 shifted tiles among 60–140 Gaussian ones; learn it and find them."""
    cohort = make_synthetic_cohort(90, dim=32, n_tiles=(60, 140), n_lesion=(3, 5), shift=8.0, seed=0)
    table = labels_for_bags(cohort.bags, cohort.labels)
    y = table.y
    train, test = cohort.bags[:50], cohort.bags[50:]
    res = fit(
        train, y[:50], [], y[:0], n_classes=2, config=TrainConfig(aggregator=name, epochs=12), seed=0
    )
    model = TrainedModel(res.model, table.classes, name, {})
    probs, hits = [], []
    for bag in test:
        p, scores = model.predict(bag)
        probs.append(p)
        if cohort.labels[bag.slide_id] == "positive":
            lesion = cohort.lesion[bag.slide_id]
            top = np.argsort(-scores, kind="stable")[: lesion.sum()]
            hits.append(lesion[top].mean())
    auc = roc_auc(y[50:], np.stack(probs))
    assert auc >= 0.9, f"{name}: held-out AUC {auc:.3f}"
    if AGGREGATORS[name].instance_level:
        assert np.mean(hits) >= 0.8, f"{name}: top-k tiles hit the lesion {np.mean(hits):.2f}"
    elif AGGREGATORS[name].score_kind == "attention":
        assert np.mean(hits) >= 0.6, f"{name}: top-k attended tiles hit the lesion {np.mean(hits):.2f}"
