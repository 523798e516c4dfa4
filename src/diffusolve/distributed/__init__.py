"""Scale-out under ``torch.distributed``: sharded sampling, streaming statistics, benches.

Run anything here under ``torchrun --nproc-per-node K`` (gloo on CPU, NCCL on GPU) or as one
plain process (a world of 1); the results are the same:

- :func:`sample_shards` / :func:`run_sharded`: samples sharded by index (shard ``s`` on rank
  ``s % world``), sample ``i`` drawn from seed ``seed + i``, written as safetensors shards
  with a ``manifest.json`` (configuration, shard ranges, checksums), resumable and refusing
  a folder of another configuration. :func:`read_shards` reads them back one at a time.
- :class:`GaussianMoments` (count, sum, sum of outer products, ``all_reduce``) for FD on any
  number of samples in one shard's memory; :class:`StreamingProjections` for sliced
  Wasserstein.
- The bench runner over ranks is :mod:`diffusolve.bench.distributed` (``open_store``,
  ``run_jobs_distributed``): jobs round-robin over the ranks, each rank's records in its own
  JSONL part, merged by rank 0 into the records file of a one-process run.

Example:
    >>> from diffusolve.distributed import init
    >>> ctx = init()  # no torchrun environment: rank 0 of 1
    >>> ctx.rank, ctx.world
    (0, 1)
"""

from .context import DistContext, current, init
from .sampling import sample_shards, seeded_producer
from .shards import (
    FORMAT,
    MANIFEST,
    ConfigMismatchError,
    ShardPlan,
    ShardReport,
    read_shards,
    run_sharded,
    tensor_sha256,
)
from .stats import GaussianMoments, StreamingProjections, streaming_fd

__all__ = [
    "DistContext",
    "current",
    "init",
    "ShardPlan",
    "ShardReport",
    "ConfigMismatchError",
    "run_sharded",
    "read_shards",
    "tensor_sha256",
    "MANIFEST",
    "FORMAT",
    "sample_shards",
    "seeded_producer",
    "GaussianMoments",
    "StreamingProjections",
    "streaming_fd",
]
