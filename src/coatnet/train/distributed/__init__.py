"""Training across processes and machines with torchrun, one topic per module:
- coatnet.process_group: the process group, rank and world size, collectives (shared with data/);
- batches.py: the rank's slice of each global batch, micro-batches, the loss scale;
- sync_batchnorm.py: BatchNorm over the global batch, on any device and backend;
- data_parallel.py: DDP and FSDP2 wrapping, whole model and optimizer states in and out.

Why N processes reproduce one process with the same global batch B:
- the sequence of global batches depends on the seed only; rank r trains on a contiguous slice of each
  (`rank_slice`), so the union over ranks is the batch one process would see;
- each rank's loss is its mean over its slice times `loss_scale(...)`, so that the mean over ranks that
  DDP and FSDP apply to gradients equals the gradient of the mean over the global batch;
- BatchNorm statistics are those of the global batch (`SyncBatchNorm`, also on CPU with gloo).
What remains is floating-point reordering of sums (relative differences ~1e-6 per step).
"""
from ...process_group import (DistributedEnv, all_reduce_sums, any_rank, barrier, broadcast_object, current_env,
                              destroy_distributed, init_distributed, is_main, local_threads, rank_and_world)
from .batches import loss_scale, rank_slice, shard, split_micro_batches
from .data_parallel import (apply_fsdp, broadcast_module_state, full_model_state, full_optimizer_state_dict,
                            gradient_sync, is_sharded, load_full_state, shard_optimizer_state_dict, unwrap, wrap_ddp,
                            wrap_model)
from .sync_batchnorm import (SyncBatchNorm, SyncBatchNormChannelsLast, TorchSyncBatchNorm,
                             TorchSyncBatchNormChannelsLast, convert_sync_batchnorm)

__all__ = [
    "DistributedEnv", "all_reduce_sums", "any_rank", "barrier", "broadcast_object", "current_env",
    "destroy_distributed", "init_distributed", "is_main", "local_threads", "rank_and_world", "loss_scale", "rank_slice",
    "shard", "split_micro_batches", "apply_fsdp", "broadcast_module_state", "full_model_state",
    "full_optimizer_state_dict", "gradient_sync", "is_sharded", "load_full_state", "shard_optimizer_state_dict",
    "unwrap", "wrap_ddp", "wrap_model",
    "SyncBatchNorm", "SyncBatchNormChannelsLast", "TorchSyncBatchNorm", "TorchSyncBatchNormChannelsLast",
    "convert_sync_batchnorm",
]
