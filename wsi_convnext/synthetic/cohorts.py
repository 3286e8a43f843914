"""Labelled synthetic cohorts and the demo's slides."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import write_csv
from ..errors import ConfigError
from .shapes import PEN_INKS, SyntheticSlide, SyntheticSlideSpec, TissueSpec, _rng
from .write import write_synthetic_slide



@dataclass
class CohortSlide:
    """One slide of a synthetic cohort with its labels and truth.

    Attributes:
        slide_id: File stem, the ``slide_id`` column of ``labels.csv``.
        patient_id: Patient the slide belongs to.
        label: ``"tumor"`` or ``"normal"``.
        slide: The written slide with its ground truth.
    """

    slide_id: str
    patient_id: str
    label: str
    slide: SyntheticSlide

    @property
    def path(self) -> Path:
        """The slide file."""
        return self.slide.path

    def lesion_mask(self, mpp_mask: float) -> np.ndarray:
        """Boolean lesion truth at ``mpp_mask`` µm/px (all False for normal slides)."""
        return self.slide.lesion_mask(mpp_mask)

    def tissue_mask(self, mpp_mask: float) -> np.ndarray:
        """Boolean tissue truth at ``mpp_mask`` µm/px."""
        return self.slide.tissue_mask(mpp_mask)


def make_cohort(
    out_dir: str | os.PathLike[str],
    n_slides: int,
    *,
    positive_fraction: float = 0.5,
    lesion_fraction: tuple[float, float] = (0.01, 0.05),
    size: tuple[int, int] = (6000, 4500),
    mpp: float = 0.5,
    seed: int = 0,
    n_patients: int | None = None,
    flavour: str = "aperio",
    compression: str = "jpeg",
    pale_fraction: float = 0.1,
    pen_fraction: float = 0.15,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[CohortSlide]:
    """Write a labelled cohort of varied synthetic slides plus ``labels.csv``.

    ``round(n_slides · positive_fraction)`` slides are ``"tumor"`` (1–3 lesions covering
    ``lesion_fraction`` of the tissue, at least ~4 tiles of 224 px at 0.5 µm/px); the rest
    are ``"normal"``. Slides differ in stain, tissue amount and shape, texture, and a few
    are pale or carry pen marks (confounders: ink looks dark, pale lesions look faint). By
    default about a quarter of the patients have 2 slides.

    Args:
        out_dir: Folder to write into (created if missing).
        n_slides: Number of slides.
        positive_fraction: Fraction of tumour slides.
        lesion_fraction: ``(low, high)`` lesion area as a fraction of the tissue area.
        size: ``(width, height)`` of level 0 (px).
        mpp: Level-0 pixel size (µm/px).
        seed: Cohort seed.
        n_patients: Number of patients (≤ n_slides); default ``ceil(0.8 · n_slides)``.
        flavour: ``"aperio"`` (``.svs`` files) or ``"generic"`` (``.tiff``).
        compression: Tile compression, see :class:`SyntheticSlideSpec`.
        pale_fraction: Probability that a slide is pale (under-stained).
        pen_fraction: Probability that a slide carries pen marks (1–2 colours).
        workers: Threads per slide.
        progress: Called as ``progress(slides_done, n_slides)``.

    Returns:
        One :class:`CohortSlide` per slide, in ``labels.csv`` order.
    """
    if n_slides < 1:
        raise ConfigError(f"make_cohort n_slides={n_slides} must be >= 1")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ConfigError(f"make_cohort positive_fraction={positive_fraction} must be in 0–1")
    n_pat = n_patients if n_patients is not None else max(1, math.ceil(0.8 * n_slides))
    if not 1 <= n_pat <= n_slides:
        raise ConfigError(f"make_cohort n_patients={n_patients} must be between 1 and n_slides={n_slides}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed, "cohort")
    n_pos = round(n_slides * positive_fraction)
    labels = np.array(["tumor"] * n_pos + ["normal"] * (n_slides - n_pos))
    rng.shuffle(labels)
    # Every patient gets one slide; the remaining slides go to distinct random patients first.
    extra = rng.permutation(np.arange(n_slides - n_pat) % n_pat) if n_slides > n_pat else np.array([], int)
    patient_of = np.concatenate([np.arange(n_pat), extra]).astype(int)
    order = rng.permutation(n_slides)
    patient_of = patient_of[order]
    ext = ".svs" if flavour == "aperio" else ".tiff"
    slides = []
    for i in range(n_slides):
        srng = _rng(seed * 100003 + i, "cohort-slide")
        tumor = labels[i] == "tumor"
        pens: tuple[str, ...] = ()
        if srng.random() < pen_fraction:
            pens = tuple(str(c) for c in srng.choice(list(PEN_INKS), size=int(srng.integers(1, 3)), replace=False))
        spec = SyntheticSlideSpec(
            width=int(size[0]), height=int(size[1]), mpp=mpp, flavour=flavour, compression=compression,
            seed=int(seed * 100003 + i),
            tissue=TissueSpec(
                n_blobs=int(srng.integers(1, 4)), coverage=float(srng.uniform(0.15, 0.5)),
                n_fragments=int(srng.integers(0, 5)), n_holes=int(srng.integers(0, 4)),
                roughness=float(srng.uniform(0.1, 0.35)),
            ),
            stain_variation=float(srng.uniform(0.5, 1.5)),
            pale=bool(srng.random() < pale_fraction),
            pen_marks=pens,
            lesions=int(srng.choice([1, 1, 1, 2, 3])) if tumor else 0,
            lesion_fraction=tuple(lesion_fraction),
        )
        slide_id = f"slide_{i:03d}"
        slide = write_synthetic_slide(out / f"{slide_id}{ext}", spec, workers=workers)
        slides.append(CohortSlide(slide_id, f"patient_{patient_of[i]:03d}", str(labels[i]), slide))
        if progress is not None:
            progress(i + 1, n_slides)
    write_csv(out / "labels.csv", ["slide_id", "label", "patient_id"], [[s.slide_id, s.label, s.patient_id] for s in slides])
    return slides


def demo_slides(out_dir: str | os.PathLike[str], n: int = 3, seed: int = 0, *,
                workers: int | None = None) -> list[SyntheticSlide]:
    """Write ``n`` small varied slides (a few seconds each) for ``wsi-convnext demo``.

    The variants cycle through: an Aperio 20× slide (0.5 µm/px) with a lesion and blue/green
    pen marks; a pale generic TIFF; a 40×-like Aperio slide (0.25 µm/px) with a lesion;
    a slide without mpp metadata; a blank slide with a black pen mark.

    Returns:
        The written slides, with ground truth.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    variants: list[tuple[str, dict[str, Any]]] = [
        ("demo_pen", dict(width=6000, height=5000, mpp=0.5, pen_marks=("blue", "green"), lesions=1,
                          tissue=TissueSpec(n_blobs=2, coverage=0.35))),
        ("demo_pale", dict(width=6000, height=5000, mpp=0.5, pale=True, flavour="generic",
                           tissue=TissueSpec(n_blobs=1, coverage=0.3, n_holes=3))),
        ("demo_40x", dict(width=8000, height=6000, mpp=0.25, lesions=2, lesion_fraction=(0.03, 0.06),
                          tissue=TissueSpec(n_blobs=2, coverage=0.4))),
        ("demo_nompp", dict(width=6000, height=5000, mpp=None, tissue=TissueSpec(n_blobs=3, coverage=0.25))),
        ("demo_blank", dict(width=4000, height=3000, mpp=0.5, blank=True, pen_marks=("black",))),
    ]
    slides = []
    for i in range(n):
        name, kw = variants[i % len(variants)]
        rep = i // len(variants)
        stem = name if rep == 0 else f"{name}_{rep}"
        spec = SyntheticSlideSpec(seed=seed * 1000 + i, **kw)
        ext = ".svs" if spec.flavour == "aperio" else ".tiff"
        slides.append(write_synthetic_slide(out / f"{stem}{ext}", spec, workers=workers))
    return slides

