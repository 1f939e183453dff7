"""Data-parallel (`ddp`) and fully sharded (`fsdp`) DP training on torch.distributed."""
from dptrain.distributed.parallel import DataParallel, FullyShardedDP, Parallel, make_parallel
from dptrain.distributed.runtime import DistEnv, init_distributed

__all__ = ["DataParallel", "DistEnv", "FullyShardedDP", "Parallel", "init_distributed", "make_parallel"]
