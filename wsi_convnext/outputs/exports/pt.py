"""``pt``: ``OUT/<slide_id>.pt``, the (N, D) float tensor alone, as CLAM's ``pt_files``."""

from __future__ import annotations

from pathlib import Path

from . import ExportFormat, SlideExport, register_format


def write_pt(path: Path, item: SlideExport) -> None:
    """Save the features as one torch tensor."""
    import numpy as np
    import torch

    torch.save(torch.from_numpy(np.ascontiguousarray(item.features)), path)


register_format(ExportFormat("pt", ".pt", write_pt, "torch tensor (N, D) of features only, CLAM pt_files layout"))
