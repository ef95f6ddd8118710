"""Train a toy embedding model with a class-sharded ArcFace head on 2 CPU processes.

    torchrun --nproc_per_node=2 docs/examples/train_sharded.py

Each rank owns half of the class centres (and their optimizer state); the
backbone is replicated with DDP. The loss printed is the mean over the global
batch (the same on every rank). Uses gloo on CPU, NCCL when CUDA is available.
"""
import datetime
import gc
import os
import tempfile

import torch
import torch.distributed as dist

import simcore
from simcore import load_resharded

NUM_CLASSES, DIM_IN, DIM, BATCH, STEPS = 500, 32, 64, 64, 80


def main():
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)

    # toy data: class k has a fixed random prototype; samples are noisy copies (same on every rank)
    prototypes = torch.randn(NUM_CLASSES, DIM_IN, generator=torch.Generator().manual_seed(0)).to(device)
    data_gen = torch.Generator().manual_seed(1000 + rank)   # each rank draws its own batches
    sample_gen = torch.Generator().manual_seed(2000 + rank)  # and its own negatives (seed per rank)

    torch.manual_seed(0)  # identical backbone init on every rank (DDP also broadcasts rank 0's)
    backbone = torch.nn.Sequential(torch.nn.Linear(DIM_IN, 128), torch.nn.ReLU(), torch.nn.Linear(128, DIM)).to(device)
    backbone = torch.nn.parallel.DistributedDataParallel(backbone)
    head = simcore.PartialMarginHead(NUM_CLASSES, DIM, margin=0.4, scale=40.0, sample_rate=0.2, lr=0.5,
                                     momentum=0.9, process_group=dist.group.WORLD, device=device)
    opt = torch.optim.SGD(backbone.parameters(), lr=0.05, momentum=0.9)

    for step in range(STEPS):
        # the last step has unequal batch sizes per rank (a ragged last batch): supported
        b = BATCH if step < STEPS - 1 else BATCH // (rank + 2)
        labels = torch.randint(NUM_CLASSES, (b,), generator=data_gen).to(device)
        x = prototypes[labels] + 0.3 * torch.randn(b, DIM_IN, generator=data_gen).to(device)
        loss = head(backbone(x), labels, generator=sample_gen)
        opt.zero_grad()
        head.zero_grad()
        loss.backward()   # DDP averages backbone grads; the head scales ∂L/∂x by world size to match
        opt.step()
        head.step()       # sparse update of this rank's sampled centre rows
        if rank == 0 and (step % 10 == 0 or step == STEPS - 1):
            print(f"step {step:3d}  loss {loss.item():.3f}  (world size {world}, shard {head.shard})", flush=True)

    # checkpoint: one file per rank, reloadable at any world size (here: into a 1-process head)
    ckpt_dir = os.environ.get("CKPT_DIR") or tempfile.gettempdir()
    path = os.path.join(ckpt_dir, f"sharded_head.rank{rank}.pt")
    torch.save(head.state_dict(), path)
    dist.barrier()
    if rank == 0:
        single = simcore.PartialMarginHead(NUM_CLASSES, DIM, margin=0.4, scale=40.0, lr=0.5, momentum=0.9)
        load_resharded(single, [os.path.join(ckpt_dir, f"sharded_head.rank{r}.pt") for r in range(world)])
        assert torch.equal(single.weight[slice(*head.shard)], head.weight.cpu())
        print(f"reloaded {world} shards into a single-process head: {tuple(single.weight.shape)}", flush=True)
    dist.barrier()
    del head      # free the head (it and its optimizer form a cycle) before the group goes:
    gc.collect()  # docs/distributed.md, "Ending a run"
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
