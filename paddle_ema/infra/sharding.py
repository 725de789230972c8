"""Sharded averages: each of N data-parallel ranks keeps the shadow of about 1/N of the weights.

Under data parallelism every rank holds the same weights after each step, so every rank could
update every shadow; sharding has rank r update only the shadows it owns (no communication during
training) and moves averages between ranks only when they are needed whole: applying them for
evaluation or export, and saving. Ownership is a balanced partition by size, computed the same way
on every rank from the parameter sizes alone, so no rank has to be told who owns what.
"""

import heapq
from typing import Any, List, Optional, Sequence

import paddle

from .. import _compat, kernels

__all__ = ["partition", "Sharding"]


def partition(sizes: Sequence[int], world_size: int) -> List[int]:
    """The owner of each tensor: largest tensors first, each to the least-loaded rank.

    Deterministic (ties go to the lower index and the lower rank), so every rank computes the same.

    Args:
        sizes: the tensors' element counts.
        world_size: the number of ranks, >= 1.

    Returns:
        owner[i], the rank (0 .. world_size - 1) that owns tensor i.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owners = [0] * len(sizes)
    loads = [(0, rank) for rank in range(world_size)]
    heapq.heapify(loads)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + sizes[index], rank))
    return owners


class Sharding:
    """Who owns which tensor in a process group, and the broadcast that makes averages whole.

    Args:
        sizes: the tensors' element counts, in the same order on every rank.
        group: the process group (a `paddle.distributed` group); None for the global one.
    """

    def __init__(self, sizes: Sequence[int], group: Optional[Any] = None):
        import paddle.distributed as dist

        self.group = group
        if group is not None:
            self.world_size, self.rank, self.ranks = group.nranks, group.rank, list(group.ranks)
        else:
            self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
            self.ranks = list(range(self.world_size))
        self.owners = partition(list(sizes), self.world_size)
        self.owned = [i for i, owner in enumerate(self.owners) if owner == self.rank]

    @paddle.no_grad()
    def broadcast_into(self, targets: Sequence[paddle.Tensor], shadows: Sequence[Optional[paddle.Tensor]],
                       shadow_dtypes: Sequence[Any], place: Any) -> None:
        """targets[i] <- the owner's shadows[i] for every i, on every rank (a collective call).

        One broadcast per (owner, dtype): the owner packs its shadows into one flat buffer on
        `place` (where the collective runs), the others receive into an empty one.

        Args:
            targets: the tensors to fill, one per tensor, on every rank.
            shadows: the shadows; `shadows[i]` is read on its owner only (None elsewhere is fine).
            shadow_dtypes: each shadow's dtype, known on every rank.
            place: where the collective runs.
        """
        import paddle.distributed as dist

        if self.world_size == 1:  # one process owns everything; no group need exist
            kernels.copy_(targets, shadows)
            return
        buckets = {}
        for index, owner in enumerate(self.owners):
            buckets.setdefault((owner, str(shadow_dtypes[index])), []).append(index)
        for (owner, _), indices in sorted(buckets.items()):
            numels = [int(targets[i].numel()) for i in indices]
            if self.rank == owner:
                flat = paddle.concat([shadows[i].reshape([-1]) for i in indices])
            else:
                flat = paddle.empty([sum(numels)], dtype=shadow_dtypes[indices[0]])
            if not _compat.same_place(flat.place, place):
                flat = _compat.copy_to_place(flat, place)
            dist.broadcast(flat, src=self.ranks[owner], group=self.group)
            pieces = paddle.split(flat, numels)
            kernels.copy_([targets[i] for i in indices], [p.reshape(targets[i].shape) for i, p in zip(indices, pieces)])
