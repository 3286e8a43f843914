"""One rank of :func:`~wsi_convnext.pretrain.train.pretrain_on_node`: ``python -m wsi_convnext.pretrain CONFIG_JSON``
(started by ``torchrun``; the configuration is :meth:`PretrainConfig.to_dict` as JSON)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import WsiConvnextError
from .config import PretrainConfig
from .train import RANK_ERROR, pretrain_encoder

if __name__ == "__main__":
    try:
        pretrain_encoder(PretrainConfig.from_dict(json.loads(Path(sys.argv[1]).read_text())))
    except WsiConvnextError as exc:
        print(f"{RANK_ERROR}{exc}", file=sys.stderr)
        sys.exit(1)
