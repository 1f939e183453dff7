import multiprocessing
import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One share of the cores per xdist worker: two workers with two threads each on two cores spend
# their time waiting for each other's threads.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))
# Tests that start worker processes use the "forkserver" start method: each worker forks from one
# server that has imported torch and the trainer once, where a fresh interpreter per worker spends
# seconds of CPU on imports alone. The server only imports (no OpenMP region, no thread), so
# forking from it is safe.
multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "dptrain.train.trainer",
                                        "dptrain.distributed.parallel", "dptrain.privacy.data_ledger"])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
