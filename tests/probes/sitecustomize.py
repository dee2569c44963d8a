"""Imported at start-up by the processes tests/test_distributed.py launches (PYTHONPATH): at the end of the run,
each rank reports how many DDP wrappers are still alive when it destroys its process group. One alive then frees
the group from the reducer, with the GIL held, and the launch can hang (medicalgpt.training.end_process_group)."""

import gc
import os
import sys

if "LOCAL_RANK" in os.environ:  # a launched rank, not the launcher
    import torch.distributed
    from torch.nn.parallel import DistributedDataParallel

    destroy = torch.distributed.destroy_process_group

    def destroy_and_report(*args, **kwargs):
        alive = sum(isinstance(obj, DistributedDataParallel) for obj in gc.get_objects())
        sys.stderr.write(f"rank {os.environ['LOCAL_RANK']}: {alive} DDP wrappers alive at destroy_process_group\n")
        return destroy(*args, **kwargs)

    torch.distributed.destroy_process_group = destroy_and_report
