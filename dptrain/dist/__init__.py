"""Data-parallel (`ddp`) and fully sharded (`fsdp`) DP training on torch.distributed."""
from dptrain.dist.parallel import DataParallel, FullyShardedDP, Parallel, make_parallel
from dptrain.dist.runtime import DistEnv, init_distributed

__all__ = ["DataParallel", "DistEnv", "FullyShardedDP", "Parallel", "init_distributed", "make_parallel"]
