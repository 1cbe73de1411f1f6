import os
from logging import getLogger

import torch
import torch.distributed as dist

logger = getLogger()


def init_distributed(port=40112, rank_and_world_size=(None, None), backend=None):
    """Join (or create) the default process group; returns (world_size, rank).

    rank/world size come from the argument, else from torchrun/submitit variables (RANK, WORLD_SIZE), else from
    SLURM (SLURM_PROCID, SLURM_NTASKS); a single process needs no group. Unlike ijepa, a failure to initialise a
    multi-process group is an error, not a silent fall-back to independent single-process runs.
    Backend: NCCL on CUDA, gloo on CPU.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    rank, world_size = rank_and_world_size
    if rank is None or world_size is None:
        if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
            rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        elif 'SLURM_NTASKS' in os.environ and 'SLURM_PROCID' in os.environ:
            rank, world_size = int(os.environ['SLURM_PROCID']), int(os.environ['SLURM_NTASKS'])
            os.environ.setdefault('MASTER_ADDR', os.environ.get('SLURM_LAUNCH_NODE_IPADDR', 'localhost'))
        else:
            return 1, 0
    if world_size == 1:
        return 1, 0
    os.environ.setdefault('MASTER_ADDR', 'localhost')
    os.environ.setdefault('MASTER_PORT', str(port))
    backend = backend or ('nccl' if torch.cuda.is_available() else 'gloo')
    dist.init_process_group(backend=backend, world_size=world_size, rank=rank)
    logger.info(f'initialised {backend} process group: rank {rank} of {world_size}')
    return world_size, rank


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class AllGather(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x):
        if is_distributed():
            x = x.contiguous()
            outputs = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(outputs, x)
            return torch.cat(outputs, 0)
        return x

    @staticmethod
    def backward(ctx, grads):
        if is_distributed():
            s = (grads.shape[0] // dist.get_world_size()) * dist.get_rank()
            e = (grads.shape[0] // dist.get_world_size()) * (dist.get_rank() + 1)
            grads = grads.contiguous()
            dist.all_reduce(grads)
            return grads[s:e]
        return grads


class AllReduceSum(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x):
        if is_distributed():
            x = x.contiguous()
            dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grads):
        return grads


class AllReduce(torch.autograd.Function):
    """Mean over ranks in the forward pass, identity backward (ijepa's loss reduction)."""

    @staticmethod
    def forward(ctx, x):
        if is_distributed():
            x = x.contiguous() / dist.get_world_size()
            dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grads):
        return grads
