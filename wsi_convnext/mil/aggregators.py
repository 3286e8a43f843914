"""MIL aggregators: a bag of tile embeddings (N, D) → slide logits (C,) and per-tile scores (N,).

Aggregators live in a registry. Adding one is one class with a decorator::

    @register_aggregator("my_pool")
    class MyPool(Aggregator):
        def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 128) -> None: ...
        def forward(self, x: Tensor, target: int | None = None) -> AggregatorOutput: ...

Binary tasks use a single positive-class logit ``z`` internally and return logits ``(0, z)``, so the
softmax probability of the positive class is ``sigmoid(z)`` and cross-entropy on the returned logits is
binary cross-entropy. Instance-level aggregators (DSMIL, max pooling) then have one meaningful
"critical instance" (the most positive tile) instead of one per class.

``tile_scores`` (N,) is what heatmaps and top-k tile lists use: attention weights for attention
aggregators, instance logits for instance aggregators. For binary tasks it always refers to the
positive class; for multi-class tasks with per-class scores it refers to the predicted class, and the
full (N, C) matrix is in ``class_tile_scores``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .config import AGGREGATORS

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "AggregatorOutput",
    "build_aggregator",
    "register_aggregator",
    "MeanPool",
    "MaxPool",
    "GatedAttentionMIL",
    "DSMIL",
    "CLAMSingleBranch",
]


_A = TypeVar("_A", bound="Aggregator")


@dataclass
class AggregatorOutput:
    """What every aggregator's forward returns.

    Attributes:
        logits: Slide logits, shape (C,).
        tile_scores: Per-tile score, shape (N,): attention or instance score (positive class for
            binary tasks, predicted class for multi-class tasks); higher = more important.
        aux_loss: Optional scalar added to the bag cross-entropy during training (only computed when
            ``target`` is passed to forward).
        class_tile_scores: Optional per-class tile scores, shape (N, C).
        extras: Other named tensors (e.g. DSMIL's per-stream logits), for inspection.
    """

    logits: Tensor
    tile_scores: Tensor
    aux_loss: Tensor | None = None
    class_tile_scores: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


class Aggregator(nn.Module):
    """Base class: ``forward(x (N, D) float32, target: int | None) -> AggregatorOutput``.

    Subclasses must accept ``in_dim`` and ``n_classes`` as their first two constructor arguments;
    every other constructor argument is a JSON-serialisable hyperparameter with a default (they are
    stored in the checkpoint config).
    """

    name: str = ""
    instance_level: bool = False
    """True when the model has an instance classifier (critical-instance / max-instance designs)."""
    score_kind: str = "attention"
    """What ``tile_scores`` are: ``"attention"`` (softmax weights, sum to 1) or ``"instance_logit"``."""

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        if int(in_dim) < 1:
            raise ConfigError(f"aggregator {self.name!r}: in_dim must be >= 1, got {in_dim}")
        if int(n_classes) < 2:
            raise ConfigError(f"aggregator {self.name!r}: n_classes must be >= 2, got {n_classes}")
        self.in_dim = int(in_dim)
        self.n_classes = int(n_classes)
        # Binary → one positive logit; multi-class → one logit per class.
        self.n_out = 1 if self.n_classes == 2 else self.n_classes

    @classmethod
    def check_options(cls, **kwargs: Any) -> None:
        """Fail fast on an unknown or bad hyperparameter: build a tiny instance (the global RNG is untouched).

        Raises:
            ConfigError: Unknown hyperparameter.
        """
        with torch.random.fork_rng(devices=[]):
            build_aggregator(cls.name, 1, 2, **kwargs)

    def to_logits(self, z: Tensor) -> Tensor:
        """Map raw outputs (..., n_out) to class logits (..., C) (binary: prepend a zero logit)."""
        if self.n_out == 1:
            return torch.cat([torch.zeros_like(z), z], dim=-1)
        return z

    def select_class_scores(self, scores: Tensor, logits: Tensor) -> Tensor:
        """Per-tile scores (N, n_out) → (N,): positive class (binary) or predicted class."""
        if scores.shape[1] == 1:
            return scores[:, 0]
        return scores[:, int(torch.argmax(logits))]

    def forward(self, x: Tensor, target: int | None = None) -> AggregatorOutput:  # pragma: no cover
        raise NotImplementedError


def register_aggregator(name: str, *, replace: bool = False) -> Callable[[type[_A]], type[_A]]:
    """Class decorator that adds an :class:`Aggregator` subclass to :data:`AGGREGATORS` under ``name``
    (the :class:`~wsi_convnext._registry.Registry` rule)."""

    def deco(cls: type[_A]) -> type[_A]:
        if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
            raise TypeError(f"@register_aggregator({name!r}) must decorate an Aggregator subclass")
        AGGREGATORS.register(name, cls, replace=replace)
        cls.name = name
        return cls

    return deco


def aggregator_defaults(name: str) -> dict[str, Any]:
    """Default hyperparameters (constructor keyword arguments) of the aggregator ``name``."""
    cls = _get_class(name)
    params = list(inspect.signature(cls.__init__).parameters.values())[3:]  # self, in_dim, n_classes
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _get_class(name: str) -> type[Aggregator]:
    return AGGREGATORS.lookup(name)


def build_aggregator(name: str, in_dim: int, n_classes: int, **kwargs: Any) -> Aggregator:
    """Build the registered aggregator ``name``.

    Args:
        name: Registry name (see :data:`AGGREGATORS`).
        in_dim: Embedding dimension D of the tiles.
        n_classes: Number of slide classes C (>= 2).
        **kwargs: Hyperparameters; ``None`` values are dropped so they never override defaults.

    Raises:
        ConfigError: Unknown name or hyperparameter.
    """
    cls = _get_class(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    allowed = aggregator_defaults(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(
            f"aggregator {name!r} has no option(s) {', '.join(unknown)}; "
            f"valid: {', '.join(sorted(allowed)) or 'none'}"
        )
    return cls(int(in_dim), int(n_classes), **kwargs)


def _projection(in_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))


@register_aggregator("mean")
class MeanPool(Aggregator):
    """Baseline: mean-pooled embedding → linear classifier.

    The classifier is linear, so the slide logit is the mean of per-tile logits; those per-tile logits
    are the tile scores.
    """

    score_kind = "instance_logit"

    def __init__(self, in_dim: int, n_classes: int, dropout: float = 0.0) -> None:
        super().__init__(in_dim, n_classes)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_dim, self.n_out)

    def forward(self, x: Tensor, target: int | None = None) -> AggregatorOutput:
        z = self.classifier(self.dropout(x.mean(dim=0)))
        logits = self.to_logits(z)
        with torch.no_grad():
            inst = self.classifier(x) if x.shape[0] * self.n_out <= 2**26 else _chunked(self.classifier, x)
        return AggregatorOutput(
            logits=logits,
            tile_scores=self.select_class_scores(inst, logits),
            class_tile_scores=self.to_logits(inst) if self.n_out > 1 else None,
        )


def _chunked(fn: Callable[[Tensor], Tensor], x: Tensor, chunk: int = 65536) -> Tensor:
    return torch.cat([fn(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])


@register_aggregator("maxpool")
class MaxPool(Aggregator):
    """Instance classifier (small MLP) on every tile; slide logit = mean of the top-k tile logits.

    ``topk=1`` is classic max pooling (Wang et al., "Revisiting multiple instance neural networks",
    Pattern Recognition 2018). Tile scores are the instance logits.
    """

    instance_level = True
    score_kind = "instance_logit"

    def __init__(
        self, in_dim: int, n_classes: int, hidden_dim: int = 128, dropout: float = 0.25, topk: int = 1
    ) -> None:
        super().__init__(in_dim, n_classes)
        if int(topk) < 1:
            raise ConfigError(f"aggregator 'maxpool': topk must be >= 1, got {topk}")
        self.topk = int(topk)
        self.project = _projection(in_dim, hidden_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, self.n_out)

    def forward(self, x: Tensor, target: int | None = None) -> AggregatorOutput:
        inst = self.classifier(self.project(x))  # (N, n_out)
        k = min(self.topk, inst.shape[0])
        z = torch.topk(inst, k, dim=0).values.mean(dim=0)
        logits = self.to_logits(z)
        return AggregatorOutput(
            logits=logits,
            tile_scores=self.select_class_scores(inst.detach(), logits),
            class_tile_scores=inst.detach() if self.n_out > 1 else None,
        )


class _GatedAttention(nn.Module):
    """Gated attention scores a_i = w^T (tanh(V h_i) ⊙ sigmoid(U h_i)) (Ilse et al. 2018, eq. 9)."""

    def __init__(self, dim: int, attn_dim: int, dropout: float, n_heads: int = 1) -> None:
        super().__init__()
        self.V = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.U = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(attn_dim, n_heads)

    def forward(self, h: Tensor) -> Tensor:
        return self.w(self.V(h) * self.U(h))  # (N, n_heads), unnormalised


@register_aggregator("abmil")
class GatedAttentionMIL(Aggregator):
    """Gated attention-based deep MIL.

    Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018.
    Tiles are projected to ``hidden_dim`` (Linear+ReLU+dropout), weighted by softmax-normalised gated
    attention, summed, and classified linearly. Tile scores are the attention weights (sum to 1).
    """

    def __init__(
        self, in_dim: int, n_classes: int, hidden_dim: int = 128, attn_dim: int = 64, dropout: float = 0.25
    ) -> None:
        super().__init__(in_dim, n_classes)
        self.project = _projection(in_dim, hidden_dim, dropout)
        self.attention = _GatedAttention(hidden_dim, attn_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, self.n_out)

    def forward(self, x: Tensor, target: int | None = None) -> AggregatorOutput:
        h = self.project(x)
        a = torch.softmax(self.attention(h)[:, 0], dim=0)  # (N,)
        z = self.classifier(a @ h)
        return AggregatorOutput(logits=self.to_logits(z), tile_scores=a.detach())


@register_aggregator("dsmil")
class DSMIL(Aggregator):
    """Dual-stream MIL.

    Li, Li & Eliceiri, "Dual-stream Multiple Instance Learning Network for Whole Slide Image
    Classification with Self-supervised Contrastive Learning", CVPR 2021.

    Stream 1 (instance classifier): a linear classifier scores every tile; the max-scoring tile per
    class is the *critical instance* and its score is the stream-1 logit. Stream 2 (bag classifier):
    each tile's query is compared with the critical instance's query (scaled dot product, softmax over
    tiles), the attention-weighted sum of value vectors is classified by a per-class 1-D convolution.
    Final logit = mean of the two streams; the training loss adds the cross-entropy of each stream
    (``aux_loss``), as in the reference implementation. Tile scores are the stream-2 attention weights
    (``tile_score="attention"``) or the instance logits (``tile_score="instance"``), per class in
    ``class_tile_scores``; the instance logits are always in ``extras["instance_logits"]``.
    """

    instance_level = True

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 128,
        query_dim: int = 64,
        dropout: float = 0.25,
        stream_loss_weight: float = 0.5,
        tile_score: str = "attention",
    ) -> None:
        super().__init__(in_dim, n_classes)
        if tile_score not in ("attention", "instance"):
            raise ConfigError(f"aggregator 'dsmil': tile_score must be 'attention' or 'instance', got {tile_score!r}")
        self.tile_score = tile_score
        self.score_kind = "attention" if tile_score == "attention" else "instance_logit"
        self.stream_loss_weight = float(stream_loss_weight)
        self.project = _projection(in_dim, hidden_dim, dropout)
        self.instance_classifier = nn.Linear(hidden_dim, self.n_out)
        self.query = nn.Sequential(nn.Linear(hidden_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh())
        self.value = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim))
        self.bag_classifier = nn.Conv1d(self.n_out, self.n_out, kernel_size=hidden_dim)
        self._scale = float(query_dim) ** -0.5

    def forward(self, x: Tensor, target: int | None = None) -> AggregatorOutput:
        h = self.project(x)  # (N, H)
        inst = self.instance_classifier(h)  # (N, n_out)
        crit_idx = torch.argmax(inst.detach(), dim=0)  # (n_out,)
        z_inst = inst[crit_idx, torch.arange(self.n_out, device=x.device)]  # (n_out,)
        q = self.query(h)  # (N, Q)
        attn = torch.softmax((q @ q[crit_idx].T) * self._scale, dim=0)  # (N, n_out)
        bag = attn.T @ self.value(h)  # (n_out, H)
        z_bag = self.bag_classifier(bag.unsqueeze(0)).reshape(self.n_out)
        logits = self.to_logits(0.5 * (z_inst + z_bag))
        aux = None
        if target is not None:
            t = torch.tensor([int(target)], device=x.device)
            aux = self.stream_loss_weight * (
                F.cross_entropy(self.to_logits(z_inst)[None], t) + F.cross_entropy(self.to_logits(z_bag)[None], t)
            )
        per_tile = attn.detach() if self.tile_score == "attention" else inst.detach()
        return AggregatorOutput(
            logits=logits,
            tile_scores=self.select_class_scores(per_tile, logits),
            aux_loss=aux,
            class_tile_scores=per_tile if self.n_out > 1 else None,
            extras={
                "instance_logits": inst.detach(),
                "instance_stream_logits": self.to_logits(z_inst.detach()),
                "bag_stream_logits": self.to_logits(z_bag.detach()),
            },
        )


@register_aggregator("clam_sb")
class CLAMSingleBranch(Aggregator):
    """CLAM, single attention branch.

    Lu et al., "Data-efficient and weakly supervised computational pathology on whole-slide images",
    Nature Biomedical Engineering 2021. Gated attention pooling (as in ABMIL) plus an instance-level
    clustering loss: the ``k_sample`` most- and least-attended tiles of a slide are pseudo-labelled
    positive/negative for the slide's class by a per-class instance classifier (cross-entropy here
    instead of the paper's smooth SVM loss). ``aux_loss`` = ``inst_weight`` × that loss. Tile scores
    are the attention weights.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 128,
        attn_dim: int = 64,
        dropout: float = 0.25,
        k_sample: int = 8,
        inst_weight: float = 0.3,
        subtyping: bool | None = None,
    ) -> None:
        super().__init__(in_dim, n_classes)
        self.k_sample = int(k_sample)
        self.inst_weight = float(inst_weight)
        # Out-of-class instance supervision only makes sense when classes are mutually exclusive subtypes.
        self.subtyping = bool(n_classes > 2) if subtyping is None else bool(subtyping)
        self.project = _projection(in_dim, hidden_dim, dropout)
        self.attention = _GatedAttention(hidden_dim, attn_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, self.n_out)
        self.instance_classifiers = nn.ModuleList([nn.Linear(hidden_dim, 2) for _ in range(n_classes)])

    def forward(self, x: Tensor, target: int | None = None) -> AggregatorOutput:
        h = self.project(x)
        a_raw = self.attention(h)[:, 0]
        a = torch.softmax(a_raw, dim=0)
        logits = self.to_logits(self.classifier(a @ h))
        aux = None
        k = min(self.k_sample, h.shape[0] // 2)
        if target is not None and k >= 1:
            losses = []
            top = torch.topk(a_raw, k).indices
            bottom = torch.topk(-a_raw, k).indices
            for c, clf in enumerate(self.instance_classifiers):
                if c == int(target):
                    idx = torch.cat([top, bottom])
                    lab = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(x.device)
                elif self.subtyping:
                    idx, lab = top, torch.zeros(k, dtype=torch.long, device=x.device)
                else:
                    continue
                losses.append(F.cross_entropy(clf(h[idx]), lab))
            aux = self.inst_weight * torch.stack(losses).mean()
        return AggregatorOutput(logits=logits, tile_scores=a.detach(), aux_loss=aux)
