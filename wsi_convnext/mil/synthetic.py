"""Synthetic MIL cohorts with known lesion tiles, for tests, benchmarks and examples.

A positive slide holds a few *lesion* tiles whose embeddings are shifted along a fixed random
direction; all other tiles (and all tiles of negative slides) are drawn from the same background
distribution. This is the hard regime of slide classification: a handful of lesion tiles among
hundreds, so pooling must find them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import Bag

__all__ = ["SyntheticCohort", "make_synthetic_cohort"]


@dataclass
class SyntheticCohort:
    """Bags, labels ("negative"/"positive"), patients and per-bag lesion masks (N,) bool."""

    bags: list[Bag]
    labels: dict[str, str]
    patients: dict[str, str]
    lesion: dict[str, np.ndarray]


def make_synthetic_cohort(
    n_slides: int = 40,
    *,
    dim: int = 32,
    n_tiles: tuple[int, int] = (80, 150),
    n_lesion: tuple[int, int] = (3, 5),
    shift: float = 3.0,
    positive_fraction: float = 0.5,
    slides_per_patient: int = 1,
    correlated: bool = True,
    dtype: type = np.float16,
    seed: int = 0,
) -> SyntheticCohort:
    """Generate a binary cohort.

    Args:
        n_slides: Number of slides.
        dim: Embedding dimension D.
        n_tiles: Inclusive range of tiles per slide.
        n_lesion: Inclusive range of lesion tiles per positive slide.
        shift: Lesion shift along a random unit direction, in background standard deviations.
        positive_fraction: Fraction of positive patients.
        slides_per_patient: Slides per patient (a patient's slides share the label).
        correlated: Background with random per-dimension scales and offsets (like real embeddings)
            instead of standard normal.
        dtype: Storage dtype of the features.
        seed: RNG seed.
    """
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    scale = rng.uniform(0.5, 2.0, dim) if correlated else np.ones(dim)
    offset = rng.normal(0, 3.0, dim) if correlated else np.zeros(dim)
    n_patients = int(np.ceil(n_slides / slides_per_patient))
    n_pos = int(round(n_patients * positive_fraction))
    patient_pos = np.zeros(n_patients, dtype=bool)
    patient_pos[rng.choice(n_patients, n_pos, replace=False)] = True
    bags, labels, patients, lesion = [], {}, {}, {}
    for i in range(n_slides):
        p = i // slides_per_patient
        sid = f"slide_{i:03d}"
        n = int(rng.integers(n_tiles[0], n_tiles[1] + 1))
        z = rng.standard_normal((n, dim))
        mask = np.zeros(n, dtype=bool)
        if patient_pos[p]:
            k = int(rng.integers(n_lesion[0], n_lesion[1] + 1))
            mask[rng.choice(n, k, replace=False)] = True
            z[mask] += shift * direction
        feats = (z * scale + offset).astype(dtype)
        side = int(np.ceil(np.sqrt(n)))
        coords = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1).astype(np.int64) * 224
        bags.append(Bag(sid, feats, coords))
        labels[sid] = "positive" if patient_pos[p] else "negative"
        patients[sid] = f"patient_{p:03d}"
        lesion[sid] = mask
    return SyntheticCohort(bags, labels, patients, lesion)
