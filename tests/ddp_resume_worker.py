"""Run under torchrun by tests/test_distributed.py: each rank resumes its own run folder.

Usage: ddp_resume_worker.py DATA REPORT_DIR RUN_RANK0 RUN_RANK1 ... (nodes without a shared
filesystem, each reading its copy of the run). Writes this rank's outcome, the error message
or "finished at epoch N, process group closed", to REPORT_DIR/rank{RANK}.txt.
"""

import os
import sys
from pathlib import Path

from tiny import TINY_TRAIN_SETS

from carlzoo.training import dist
from carlzoo.training.config import load_config
from carlzoo.training.train import train


def config(data: str):
    return load_config(
        None, [*TINY_TRAIN_SETS, "data.dataset=npz", f"data.root={data}", "epochs=2", "knn_every=0"]
    )


if __name__ == "__main__":
    data, report, runs = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    rank = int(os.environ["RANK"])
    try:
        last = train(config(data), runs[rank], resume=True, progress=False)
        group = "open" if dist.is_distributed() else "closed"  # train() created it: closed
        outcome = f"finished at epoch {last['epoch']}, process group {group}"
    except ValueError as e:
        outcome = str(e)
    (report / f"rank{rank}.txt").write_text(outcome)
