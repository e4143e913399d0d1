"""Run by tests/geometry/test_pca_tokens.py under ``torchrun`` with 2 gloo processes: ``Ranks.gather_rows`` of
unequal row counts, and a probe on the PCA's token path reduced with ``Ranks.sum`` and gathered with
``Ranks.gather_rows``, against one process on the union. Rank zero writes the comparison to the JSON path given."""

import json
import sys

import torch
import torch.distributed as dist
from geometry.test_pca_tokens import TOKENS, WideView, _x

from moe_lightning.geometry import probe, probe_statistics
from moe_lightning.monitors import Ranks


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    ranks = Ranks.current()
    rank = ranks.rank
    rows = torch.full((3 + 2 * rank, 4), float(rank), dtype=torch.float64)  # 3 rows on rank 0, 5 on rank 1
    gathered = ranks.gather_rows(rows)
    view, x = WideView(seed=5), _x(26, 5)
    shard = x.tensor_split(ranks.world_size)[rank]
    report = probe(view, shard, TOKENS, reduce_fn=ranks.sum, gather_fn=ranks.gather_rows)
    if rank == 0:
        full = probe(view, x, TOKENS)
        out = {
            "gathered": gathered[:, 0].tolist(),
            "token_path": bool(probe_statistics(view, shard, TOKENS).rows),
            "ddp": report.scalars("g"),
            "single": full.scalars("g"),
            "tokens": full.tokens.tolist(),
        }
        with open(out_path, "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
