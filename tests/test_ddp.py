"""A small fused ResNet trained for a few steps under DistributedDataParallel (gloo, CPU, two
processes) ends with the parameters single-process training gives on the concatenated batch.

BatchNorm in training normalises with each process's own batch (SyncBatchNorm does not run on
the CPU), so the single-process reference runs the concatenated batch as the same two halves
("ghost batches") and averages their losses -- exactly the gradient DDP averages.
"""
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 3
PER_RANK = 4  # 64x64 images: BatchNorm sees 16+ values per channel even in layer4 (with
# 2 images at 32x32 it normalises 2 values, and its gradients amplify rounding step after step)
TIMEOUT_S = 180


def _model():
    from deeparch_kernels.models import FusedResNet
    from deeparch_kernels.nn import FusedBasicBlock

    torch.manual_seed(0)
    return FusedResNet(FusedBasicBlock, [1, 1, 1, 1], num_classes=4, backend="cpu")


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(WORLD * PER_RANK, 3, 64, 64, generator=g),
             torch.randint(0, 4, (WORLD * PER_RANK,), generator=g)) for _ in range(STEPS)]


def _optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _worker(rank, port, out_dir):
    try:
        torch.set_num_threads(1)
        from datetime import timedelta

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S))
        model = torch.nn.parallel.DistributedDataParallel(_model().train())
        opt = _optimizer(model)
        for x, y in _batches():
            sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[sl]), y[sl]).backward()
            opt.step()
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in model.module.named_parameters()},
                       os.path.join(out_dir, "ddp.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process():
    model = _model().train()
    opt = _optimizer(model)
    for x, y in _batches():
        opt.zero_grad()
        losses = [torch.nn.functional.cross_entropy(model(x[r * PER_RANK:(r + 1) * PER_RANK]),
                                                    y[r * PER_RANK:(r + 1) * PER_RANK])
                  for r in range(WORLD)]
        (sum(losses) / WORLD).backward()
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ddp_matches_single_process(tmp_path):
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    errors = [f.read_text() for f in tmp_path.glob("error*.txt")]
    assert not errors, "\n".join(errors)
    ddp = torch.load(tmp_path / "ddp.pt")
    ref = _single_process()
    assert ddp.keys() == ref.keys()
    init = _model().state_dict()
    moved = 0
    for k in ref:
        diff = (ddp[k].double() - ref[k].double()).abs().max().item()
        assert diff <= 1e-5 * max(ref[k].abs().max().item(), 1e-12), (k, diff)
        moved += not torch.equal(ref[k], init[k])
    assert moved == len(ref)  # every parameter was trained
