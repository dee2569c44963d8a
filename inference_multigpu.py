"""Data-parallel batch inference: each process answers a contiguous shard of the prompts on its own GPU (or CPU),
and rank 0 gathers the answers and writes them in input order. Same flags as inference.py's --data_file mode.

    torchrun --nproc_per_node 4 inference_multigpu.py --lora_model outputs-sft \
        --data_file questions.jsonl --output_file answers.jsonl --batch_size 16

NCCL connects the processes on GPUs, gloo on CPU.
"""

import os

import medicalgpt.quiet  # noqa: F401  (before the libraries: it filters what they print on import)

import torch
import torch.distributed as dist
from transformers import set_seed

from medicalgpt.answering import answer, check_batch_args, parse_inference_args, read_requests, write_rows
from medicalgpt.errors import UsageError, run_cli
from medicalgpt.serving import load_chat_model


def start_process_group() -> tuple[int, int]:
    """(rank, world size); each process takes the GPU of its local rank, when there are GPUs."""
    if "LOCAL_RANK" not in os.environ:
        raise UsageError("start this script with torchrun --nproc_per_node N (or use inference.py for one process)")
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"--nproc_per_node is larger than the {torch.cuda.device_count()} GPUs here")
        torch.cuda.set_device(local_rank)  # "cuda" (and bitsandbytes' placement) now means this process's GPU
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shard(items: list, rank: int, world_size: int) -> list:
    """This rank's contiguous slice; concatenating the slices in rank order gives back the input order."""
    size = -(-len(items) // world_size)
    return items[rank * size: (rank + 1) * size]


def main(argv: list[str] | None = None) -> None:
    model_args, args, gen_args = parse_inference_args(argv)
    if args.prompt is not None or args.interactive or not args.data_file:
        raise UsageError("inference_multigpu.py answers a --data_file only; use inference.py for --prompt and "
                         "--interactive")
    check_batch_args(args)
    requests = read_requests(args.data_file)
    rank, world_size = start_process_group()
    try:
        set_seed(args.seed + rank)  # sampled answers differ across shards, yet are reproducible
        chat_model = load_chat_model(model_args, args)
        rows = answer(chat_model.model, chat_model.tokenizer, chat_model.template, shard(requests, rank, world_size),
                      args, gen_args, rank == 0)
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(rows, gathered, dst=0)
        if rank == 0:
            write_rows([row for part in gathered for row in part], args.output_file)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
