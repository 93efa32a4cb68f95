"""``deeparch-bench lesson`` (also ``python -m deeparch_kernels lesson``): the lesson this library
grew from (VGG's 3x3 stacks, the degradation of deep plain nets, the shortcut that fixes it),
reproduced with the library's own fused modules, in a minute or two on a 2-core CPU.

  1. The 3x3-stack table, computed from torch modules (not typed): for C=64, one 7x7 vs three
     3x3 and one 5x5 vs two 3x3 -- weights (``parameters()``), multiply-adds per output pixel
     (torch.utils.flop_counter), receptive field (where the gradient of one output pixel reaches
     the input), ReLUs.
  2. The degradation experiment of the ResNet paper (He et al. 2015, section 4.2 and Figure 6):
     plain and residual CIFAR-style nets (deeparch_kernels.models.cifar_resnet, option-A
     shortcuts: the same parameters with and without shortcuts) of each depth, trained from the
     same seed with the same batches; per epoch the training loss (mean over the epoch's
     batches), the training error (eval mode, the whole training set) and the test error.
  3. Gradient flow, with BatchNorm and without (``norm_layer=nn.Identity``), at initialisation
     and after the first epoch, on one fixed batch in training mode: each main-path conv's
     weight-gradient norm, the error signal reaching the stem's and each block's output (the
     RMS of dL/d output) and the forward activations' RMS there; the stem/top ratios say
     whether the gradient grows (explodes) or shrinks (vanishes) toward the input.
  4. Conclusions computed from the numbers, each marked reproduced or not.

Data: ``--data digits`` (default): scikit-learn's 1,797 real 8x8 handwritten digits, shipped
inside the package (``pip install 'deeparch-kernels[lesson]'``), split 80/20 stratified with a
fixed seed. ``--data cifar10 --data-dir DIR``: CIFAR-10 as torchvision's loader reads it
(DIR/cifar-10-batches-py, never downloaded here). No augmentation: degradation is a training-error
effect. Default training (sized for the digits on a 2-core CPU): SGD momentum 0.9, weight decay
1e-4, batch 64, lr 0.03 divided by 10 after 50% and 75% of 12 epochs, seeds 0 and 1; on a Linux
CPU each seed runs in its own forked process of one thread (these nets are too small for threads
to pay), up to the number of cores. Each net is built right after ``torch.manual_seed(seed)`` and
its batches come from a generator seeded with ``seed``, so a run is deterministic on the CPU,
however many processes (on a GPU cuDNN is set deterministic, but a few CUDA kernels, e.g. adaptive
average pooling's backward, are not).

Writes lesson.json, lesson.md and lesson.png (matplotlib permitting) under ``--out``; progress on
stderr, the markdown on stdout. Exit status 0 when the run completed (whatever the conclusions),
1 when the data can't be had, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCHEMA = "deeparch-lesson/1"

# (row label, kernel size, layers) of the 3x3-stack table.
STACKS = (("one 7x7", 7, 1), ("three 3x3", 3, 3), ("one 5x5", 5, 1), ("two 3x3", 3, 2))

# Thresholds of the conclusions (fractions of the data set; ratios).
GAP = 0.01        # one net "trains worse" than another: final training error higher by > 1 point
TIE = 0.01        # "within 1 point"
EXPLODE = 10.0    # a stem/top ratio above this: the gradient grows toward the input (explodes)
VANISH = 0.1      # ... below this: it shrinks toward the input (vanishes)


class LessonError(RuntimeError):
    """The lesson can't run as asked (missing data or package); the message says what to do."""


# --------------------------------------------------------------------------- 1. the 3x3 table

def _stack(kernel: int, layers: int, channels: int, relu: bool = True) -> nn.Sequential:
    mods: List[nn.Module] = []
    for _ in range(layers):
        mods.append(nn.Conv2d(channels, channels, kernel, padding=kernel // 2, bias=False))
        if relu:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def _receptive_field(kernel: int, layers: int, channels: int) -> int:
    """Width of the input window one output pixel depends on, found by autograd: all-ones weights
    (no cancellation), no ReLU, the gradient of the centre pixel w.r.t. the input."""
    stack = _stack(kernel, layers, channels, relu=False).double()
    for p in stack.parameters():
        nn.init.ones_(p)
    size = 2 * layers * (kernel // 2) + 3
    x = torch.zeros(1, channels, size, size, dtype=torch.float64, requires_grad=True)
    stack(x)[0, :, size // 2, size // 2].sum().backward()
    cols = (x.grad[0].abs().sum(dim=(0, 1)) > 0).nonzero()
    return int(cols.max() - cols.min() + 1)


def stack_table(channels: int = 64) -> List[Dict[str, Any]]:
    """The 3x3-stack table: one row per entry of STACKS, every number measured on torch modules
    (weights without bias, as a conv followed by BatchNorm has; stride 1, 'same' padding)."""
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    size = 16
    for name, k, n in STACKS:
        stack = _stack(k, n, channels)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            stack(torch.randn(1, channels, size, size))
        rows.append({
            "name": name, "kernel": k, "layers": n, "channels": channels,
            "params": sum(p.numel() for p in stack.parameters()),
            "macs_per_pixel": counter.get_total_flops() // 2 // (size * size),
            "receptive_field": _receptive_field(k, n, channels),
            "relus": sum(isinstance(m, nn.ReLU) for m in stack),
        })
    return rows


# --------------------------------------------------------------------------- data

@dataclass
class Data:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    description: str

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])


def _standardise(x_train: Tensor, x_test: Tensor) -> Tuple[Tensor, Tensor]:
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x_train - mean) / std, (x_test - mean) / std


def load_digits_data() -> Data:
    """scikit-learn's digits (1,797 8x8 images, 10 classes), 80/20 stratified split, seed 0."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise LessonError(f"--data digits needs scikit-learn ({e}): pip install "
                          "'deeparch-kernels[lesson]' (or pip install scikit-learn), or use "
                          "--data cifar10 --data-dir DIR") from None
    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0
    y = torch.from_numpy(d.target).long()
    tr, te = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, random_state=0,
                              stratify=d.target)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    x_train, x_test = _standardise(x[tr], x[te])
    return Data("digits", x_train, y[tr], x_test, y[te], 10,
                "scikit-learn load_digits: 8x8 grey handwritten digits, 10 classes, "
                f"{len(tr)} train / {len(te)} test (stratified, seed 0), standardised")


def load_cifar10_data(data_dir: Optional[Path]) -> Data:
    """CIFAR-10 from ``data_dir`` through torchvision's loader, download=False."""
    from torchvision.datasets import CIFAR10

    if data_dir is None:
        raise LessonError("--data cifar10 needs --data-dir DIR, the folder holding "
                          "cifar-10-batches-py (torchvision.datasets.CIFAR10(DIR, download=True) "
                          "puts it there)")
    try:
        train = CIFAR10(str(data_dir), train=True, download=False)
        test = CIFAR10(str(data_dir), train=False, download=False)
    except RuntimeError as e:
        raise LessonError(f"--data-dir {data_dir}: no CIFAR-10 there ({e}). Expected "
                          f"{Path(data_dir) / 'cifar-10-batches-py'} as torchvision's CIFAR10 "
                          "loader reads it; this command never downloads: fetch it once with "
                          f"torchvision.datasets.CIFAR10({str(data_dir)!r}, download=True)") from None

    def tensors(ds) -> Tuple[Tensor, Tensor]:
        x = torch.as_tensor(ds.data).permute(0, 3, 1, 2).float() / 255.0
        return x, torch.as_tensor(ds.targets, dtype=torch.long)

    (x_train, y_train), (x_test, y_test) = tensors(train), tensors(test)
    x_train, x_test = _standardise(x_train, x_test)
    return Data("cifar10", x_train, y_train, x_test, y_test, 10,
                f"CIFAR-10 from {data_dir} (torchvision loader): 32x32 RGB, 10 classes, "
                f"{len(y_train)} train / {len(y_test)} test, standardised per channel, no augmentation")


# --------------------------------------------------------------------------- settings

@dataclass
class Settings:
    data: str = "digits"
    data_dir: Optional[str] = None
    depths: List[int] = field(default_factory=lambda: [20, 56])
    seeds: List[int] = field(default_factory=lambda: [0, 1])
    epochs: int = 12
    lr: float = 0.03
    lr_drops: List[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of the epochs
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 64
    shortcut: str = "A"
    train_samples: Optional[int] = None  # None: all
    test_samples: Optional[int] = None
    grad_batch: int = 128  # samples of the fixed batch the gradient flow is measured on
    device: str = "cpu"
    threads: Optional[int] = 1  # CPU threads per process during the run (None: torch's default)
    jobs: Optional[int] = None  # seeds run at once (None: see resolve_jobs)
    channels_last: bool = True
    backend: str = "auto"

    def milestones(self) -> List[int]:
        """Epochs after which the lr is divided by 10 (those inside the run)."""
        return sorted({m for m in (math.floor(f * self.epochs + 0.5) for f in self.lr_drops) if 1 <= m < self.epochs})


def net_name(depth: int, plain: bool) -> str:
    return f"{'plain' if plain else 'resnet'}-{depth}"


# --------------------------------------------------------------------------- measuring

def _batches(n: int, size: int, gen: torch.Generator) -> List[Tensor]:
    order = torch.randperm(n, generator=gen)
    out = [order[i:i + size] for i in range(0, n, size)]
    if len(out) > 1 and len(out[-1]) < 2:  # BatchNorm can't train on one sample
        out.pop()
    return out


@torch.no_grad()
def evaluate(net: nn.Module, x: Tensor, y: Tensor, chunk: int = 1024) -> Tuple[float, float]:
    """(mean cross-entropy, error fraction) of ``net`` in eval mode over (x, y)."""
    was_training = net.training
    net.eval()
    loss, wrong = 0.0, 0
    for i in range(0, len(y), chunk):
        out = net(x[i:i + chunk]).float()
        loss += F.cross_entropy(out, y[i:i + chunk], reduction="sum").item()
        wrong += int((out.argmax(1) != y[i:i + chunk]).sum())
    net.train(was_training)
    return loss / len(y), wrong / len(y)


def _finite(v: float) -> Optional[float]:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def _main_convs(net: nn.Module) -> List[Tuple[str, nn.Conv2d]]:
    """The stem and every block's conv1, conv2, input to output (shortcut convs left out)."""
    convs = [("conv1", net.conv1)]
    for lname in ("layer1", "layer2", "layer3"):
        for i, block in enumerate(getattr(net, lname)):
            convs += [(f"{lname}.{i}.conv1", block.conv1), (f"{lname}.{i}.conv2", block.conv2)]
    return convs


def gradient_flow(net: nn.Module, x: Tensor, y: Tensor) -> Dict[str, Any]:
    """Weight-gradient norms of the main-path convs, and the forward RMS and backward-signal RMS
    at the stem's output and every block's output, for one cross-entropy step on (x, y) in
    training mode. Measured on a copy: ``net`` (its BN statistics included) is left as it is."""
    net = copy.deepcopy(net).train()
    net.zero_grad(set_to_none=True)
    blocks = [m for lname in ("layer1", "layer2", "layer3") for m in getattr(net, lname)]
    act: List[Optional[float]] = [None] * (len(blocks) + 1)
    sig: List[Optional[float]] = [None] * (len(blocks) + 1)
    handles = []

    def keep(i: int, t: Tensor) -> None:
        act[i] = _finite(t.detach().float().pow(2).mean().sqrt().item())

        def grad_hook(g: Tensor) -> None:
            sig[i] = _finite(g.detach().float().pow(2).mean().sqrt().item())
        t.register_hook(grad_hook)

    handles.append(blocks[0].register_forward_pre_hook(lambda m, inp: keep(0, inp[0])))
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_hook(lambda m, inp, out, i=i: keep(i + 1, out)))
    try:
        F.cross_entropy(net(x).float(), y).backward()
    finally:
        for h in handles:
            h.remove()
    convs = _main_convs(net)
    norms = [_finite(c.weight.grad.float().norm().item()) if c.weight.grad is not None else None
             for _, c in convs]
    ratio = norms[0] / norms[-1] if norms[0] is not None and norms[-1] else None
    sratio = sig[0] / sig[-1] if sig[0] is not None and sig[-1] else None
    return {"conv_names": [n for n, _ in convs], "conv_grad_norm": norms,
            "block_grad_rms": sig, "block_act_rms": act,
            "grad_ratio": _finite(ratio) if ratio is not None else None,
            "signal_ratio": _finite(sratio) if sratio is not None else None}


def train(net: nn.Module, data: Data, s: Settings, seed: int, epochs: int,
          on_epoch: Optional[Callable[[int, Dict[str, Any]], None]] = None,
          measure: bool = True) -> Dict[str, Any]:
    """SGD as in ``s`` for ``epochs`` epochs (the lr schedule of s.epochs); per-epoch curves
    (the errors only when ``measure``). Stops early, marking ``diverged_at``, when the training
    loss stops being finite."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=s.milestones(), gamma=0.1)
    curves: Dict[str, List[Any]] = {"epoch": [], "lr": [], "train_loss": [], "train_error": [],
                                    "test_error": [], "seconds": []}
    diverged_at = None
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        net.train()
        total, count = 0.0, 0
        lr = opt.param_groups[0]["lr"]
        for idx in _batches(len(data.y_train), s.batch_size, gen):
            idx = idx.to(data.x_train.device)
            xb, yb = data.x_train[idx], data.y_train[idx]
            loss = F.cross_entropy(net(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(yb)
            count += len(yb)
        sched.step()
        train_loss = total / max(count, 1)
        if measure and math.isfinite(train_loss):
            _, train_err = evaluate(net, data.x_train, data.y_train)
            _, test_err = evaluate(net, data.x_test, data.y_test)
        else:
            train_err = test_err = None
        row = {"epoch": epoch, "lr": lr, "train_loss": _finite(train_loss), "train_error": train_err,
               "test_error": test_err, "seconds": time.perf_counter() - t0}
        for k, v in row.items():
            curves[k].append(v)
        if on_epoch is not None:
            on_epoch(epoch, row)
        if not math.isfinite(train_loss):
            diverged_at = epoch
            break
    curves["diverged_at"] = diverged_at
    return curves


# --------------------------------------------------------------------------- the run

def _build(depth: int, plain: bool, bn: bool, data: Data, s: Settings, seed: int) -> nn.Module:
    from .models.cifar import cifar_resnet

    torch.manual_seed(seed)
    net = cifar_resnet(depth, plain=plain, shortcut=s.shortcut,
                       norm_layer=None if bn else nn.Identity, num_classes=data.num_classes,
                       in_channels=data.in_channels, backend=s.backend)
    return net.to(s.device, memory_format=torch.channels_last if s.channels_last else torch.contiguous_format)


def _subset(data: Data, s: Settings) -> Data:
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    dev = torch.device(s.device)

    def cut(x: Tensor, y: Tensor, n: Optional[int]) -> Tuple[Tensor, Tensor]:
        x, y = (x, y) if n is None else (x[:n], y[:n])
        return x.to(dev).contiguous(memory_format=fmt), y.to(dev)

    xtr, ytr = cut(data.x_train, data.y_train, s.train_samples)
    xte, yte = cut(data.x_test, data.y_test, s.test_samples)
    return Data(data.name, xtr, ytr, xte, yte, data.num_classes,
                data.description + ("" if s.train_samples is None and s.test_samples is None else
                                    f"; using {len(ytr)} train / {len(yte)} test samples"))


def _mean(vals: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in vals if v is not None]
    return statistics.fmean(vals) if vals else None


def _median(vals: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def _mean_curves(per_seed: List[Dict[str, Any]]) -> Dict[str, List[Optional[float]]]:
    curves = [p["curves"] for p in per_seed]
    n = max(len(c["epoch"]) for c in curves)
    out: Dict[str, List[Optional[float]]] = {"epoch": list(range(1, n + 1))}
    for key in ("train_loss", "train_error", "test_error"):
        out[key] = [_mean([c[key][i] if i < len(c[key]) else None for c in curves]) for i in range(n)]
    return out


def run_seed(s: Settings, data: Data, seed: int,
             log: Callable[[str], None] = lambda m: None) -> Dict[str, Any]:
    """One seed of the lesson: for each net, the gradient flow without BatchNorm (at init and
    after one epoch), then the net with BatchNorm trained for s.epochs with its gradient flow at
    init and after the first epoch. ``data`` as _subset gives it."""
    cpu0 = time.process_time()
    gx, gy = data.x_train[:s.grad_batch], data.y_train[:s.grad_batch]
    nets: Dict[str, Dict[str, Any]] = {}
    profiles: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for plain in (True, False):
        for depth in s.depths:
            name = net_name(depth, plain)
            t0 = time.perf_counter()
            flow: Dict[str, Dict[str, Any]] = {"bn": {}, "no_bn": {}}
            bare = _build(depth, plain, False, data, s, seed)  # without BatchNorm: gradient flow only
            flow["no_bn"]["init"] = gradient_flow(bare, gx, gy)
            bare_curves = train(bare, data, s, seed, 1, measure=False)
            flow["no_bn"]["epoch1"] = gradient_flow(bare, gx, gy)
            del bare

            net = _build(depth, plain, True, data, s, seed)  # the experiment itself
            flow["bn"]["init"] = gradient_flow(net, gx, gy)

            def on_epoch(epoch: int, row: Dict[str, Any], net=net, name=name, flow=flow) -> None:
                if epoch == 1:
                    flow["bn"]["epoch1"] = gradient_flow(net, gx, gy)
                log(f"seed {seed} {name:>10} epoch {epoch:>3}/{s.epochs}: loss "
                    f"{_fmt(row['train_loss'], '.3f')}, train error {_pct(row['train_error'])}, "
                    f"test error {_pct(row['test_error'])} ({row['seconds']:.1f} s)")

            curves = train(net, data, s, seed, s.epochs, on_epoch)
            ok = curves["diverged_at"] is None
            nets[name] = {
                "depth": depth, "plain": plain, "params": sum(p.numel() for p in net.parameters()),
                "seed": seed,
                "final_train_error": curves["train_error"][-1] if ok else None,
                "final_test_error": curves["test_error"][-1] if ok else None,
                "final_train_loss": curves["train_loss"][-1] if ok else None,
                "diverged_at": curves["diverged_at"],
                "no_bn_diverged_in_epoch1": bare_curves["diverged_at"] is not None,
                "curves": {k: v for k, v in curves.items() if k != "diverged_at"},
                "grad_ratio_init": {k: flow[k]["init"]["grad_ratio"] for k in flow},
                "grad_ratio_epoch1": {k: flow[k].get("epoch1", {}).get("grad_ratio") for k in flow},
                "signal_ratio_init": {k: flow[k]["init"]["signal_ratio"] for k in flow},
                "signal_ratio_epoch1": {k: flow[k].get("epoch1", {}).get("signal_ratio") for k in flow},
                "seconds": time.perf_counter() - t0,
            }
            profiles[name] = flow
            del net
    return {"seed": seed, "nets": nets, "profiles": profiles, "cpu_seconds": time.process_time() - cpu0}


_WORKER: Dict[str, Any] = {}  # what forked workers inherit (no pickling of the data)


def _seed_in_worker(seed: int) -> Dict[str, Any]:
    s = _WORKER["settings"]
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    return run_seed(s, _WORKER["data"], seed, _WORKER["log"])


def resolve_jobs(s: Settings) -> int:
    """Seeds run at once: ``s.jobs`` when given, else on a Linux CPU one forked process per seed
    up to the cores (each with s.threads threads); one at a time on a GPU or without fork."""
    import multiprocessing

    if torch.device(s.device).type != "cpu" or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    if s.jobs is not None:
        return max(1, min(s.jobs, len(s.seeds)))
    if not sys.platform.startswith("linux"):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(len(s.seeds), cores // max(1, s.threads or 1)))


def run(s: Settings, log: Callable[[str], None] = lambda m: None,
        data: Optional[Data] = None) -> Dict[str, Any]:
    """Run the lesson with settings ``s``; the result dict that lesson.json holds. ``data``
    (optional) replaces the data set ``s.data`` names."""
    from . import __version__
    from .bench.env import device_name, git_info, now

    t_start, cpu_start = time.perf_counter(), time.process_time()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    if data is None:
        data = load_cifar10_data(Path(s.data_dir) if s.data_dir else None) if s.data == "cifar10" \
            else load_digits_data()
    data = _subset(data, s)
    device = torch.device(s.device)
    jobs = resolve_jobs(s)

    threads_before = torch.get_num_threads()
    cudnn_before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        table = stack_table()
        log(f"lesson: {data.description}")
        log(f"lesson: nets {', '.join(net_name(d, p) for p in (True, False) for d in s.depths)}; seeds "
            f"{','.join(map(str, s.seeds))}; {s.epochs} epochs; device {device}, "
            f"{torch.get_num_threads()} thread(s) per process, {jobs} process(es)")
        if jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            _WORKER.update(settings=s, data=data, log=log)
            try:
                with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as ex:
                    outs = list(ex.map(_seed_in_worker, s.seeds))
            finally:
                _WORKER.clear()
        else:
            outs = [run_seed(s, data, seed, log) for seed in s.seeds]
    finally:
        torch.set_num_threads(threads_before)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_before

    nets: Dict[str, Dict[str, Any]] = {}
    for out in outs:
        for name, e in out["nets"].items():
            entry = nets.setdefault(name, {"depth": e["depth"], "plain": e["plain"], "params": e["params"],
                                           "per_seed": []})
            entry["per_seed"].append({k: v for k, v in e.items() if k not in ("depth", "plain", "params")})
    for entry in nets.values():
        ps = entry["per_seed"]
        for key in ("final_train_error", "final_test_error", "final_train_loss"):
            entry[key] = _mean([p[key] for p in ps])
        entry["curves"] = _mean_curves(ps)
        for key in ("grad_ratio_init", "grad_ratio_epoch1", "signal_ratio_init", "signal_ratio_epoch1"):
            entry[key] = {k: _median([p[key][k] for p in ps]) for k in ("bn", "no_bn")}

    cpu_workers = sum(o["cpu_seconds"] for o in outs) if jobs > 1 else 0.0
    result: Dict[str, Any] = {
        "schema": SCHEMA,
        "date": now().isoformat(timespec="seconds"),
        "settings": {**asdict(s), "jobs": jobs, "milestones": s.milestones(),
                     "data_description": data.description,
                     "train_samples_used": len(data.y_train), "test_samples_used": len(data.y_test)},
        "device": {"device": str(device), "name": device_name(device),
                   "threads": s.threads if s.threads is not None else threads_before, "processes": jobs,
                   "cpu_count": os.cpu_count(), "torch": torch.__version__,
                   "deeparch_kernels": __version__, "git": git_info()},
        "table": table,
        "nets": nets,
        "gradient_flow": {"seed": outs[0]["seed"], "batch": min(s.grad_batch, len(data.y_train)),
                          "nets": outs[0]["profiles"]},
        "seconds": time.perf_counter() - t_start,
        "cpu_seconds": time.process_time() - cpu_start + cpu_workers,
        # the CPU time of each seed's work (its worker process, or its share of this one)
        "cpu_seconds_per_seed": {str(o["seed"]): o["cpu_seconds"] for o in outs},
        "load_average": {"start": list(load_start) if load_start else None,
                         "end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
    }
    result["conclusions"] = conclusions(result)
    return result


# --------------------------------------------------------------------------- conclusions

def _pct(v: Optional[float], digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def _fmt(v: Optional[float], spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _times(r: Optional[float]) -> str:
    """A ratio for the reader: 2,474x, 13.1x, 0.68x, 1/116."""
    if r is None:
        return "n/a"
    if r >= 100:
        return f"{r:,.0f}x"
    if r >= 0.1:
        return f"{r:.3g}x"
    return f"1/{1 / r:,.0f}" if r > 0 else "0x"


def _ratio(r: Optional[float]) -> str:
    """A ratio for a table: 2,416, 13.1, 0.642, 5.66e-06."""
    if r is None:
        return "n/a"
    return f"{r:,.0f}" if r >= 100 else (f"{r:.3g}" if r >= 0.01 else f"{r:.2e}")


def _direction(r: Optional[float]) -> str:
    if r is None:
        return "could not be measured (not finite)"
    if r > EXPLODE:
        return "grows toward the input, i.e. explodes"
    if r < VANISH:
        return "shrinks toward the input, i.e. vanishes"
    return f"stays within {EXPLODE:.0f}x from top to input"


def _claim(cid: str, claim: str, reproduced: Optional[bool], text: str) -> Dict[str, Any]:
    return {"id": cid, "claim": claim, "reproduced": reproduced, "text": text}


def conclusions(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The lesson's claims, each checked against the numbers of ``result``."""
    out: List[Dict[str, Any]] = []
    rows = {r["name"]: r for r in result["table"]}
    for big, small in (("one 7x7", "three 3x3"), ("one 5x5", "two 3x3")):
        b, s_ = rows[big], rows[small]
        ok = s_["params"] < b["params"] and s_["receptive_field"] == b["receptive_field"] \
            and s_["relus"] > b["relus"]
        c = b["channels"]
        out.append(_claim(
            f"stack-{small.replace(' ', '-')}",
            f"{small} convolutions replace {big} with fewer weights, the same view and more non-linearity",
            ok,
            f"{small} ({c} channels) see a {s_['receptive_field']}x{s_['receptive_field']} window "
            f"({big}: {b['receptive_field']}x{b['receptive_field']}) with {s_['params']:,} weights "
            f"instead of {b['params']:,} ({s_['params'] / b['params']:.2f}x; per input/output channel "
            f"pair {s_['params'] // (c * c)} vs {b['params'] // (c * c)}), "
            f"{s_['macs_per_pixel'] / b['macs_per_pixel']:.2f}x the multiply-adds per output pixel, "
            f"and {s_['relus']} ReLUs instead of {b['relus']}."))

    nets = result["nets"]
    depths = sorted({n["depth"] for n in nets.values()})
    if len(depths) < 2:
        out.append(_claim("degradation", "a deeper plain net trains worse", None,
                          "not checked: the run has one depth (--depths needs two)"))
        return out + _gradient_claims(result)
    lo, hi = depths[0], depths[-1]
    pl, ph, rl, rh = (nets.get(net_name(d, p)) for p, d in ((True, lo), (True, hi), (False, lo), (False, hi)))
    seeds = [p["seed"] for p in ph["per_seed"]]

    def by_seed(entry, key):
        return [p[key] for p in entry["per_seed"]]

    def err(v):
        return 1.0 if v is None else v  # a diverged net counts as 100% error

    gaps = [err(a) - err(b) for a, b in zip(by_seed(ph, "final_train_error"), by_seed(pl, "final_train_error"))]
    k = sum(g > GAP for g in gaps)
    out.append(_claim(
        "degradation", f"plain-{hi} trains worse than plain-{lo} (the degradation problem)", k == len(gaps),
        f"plain-{hi} ends at {_pct(ph['final_train_error'])} training error vs {_pct(pl['final_train_error'])} "
        f"for plain-{lo} (mean of {len(seeds)} seeds; per seed "
        + ", ".join(f"{_pct(a)} vs {_pct(b)}" for a, b in zip(by_seed(ph, "final_train_error"),
                                                              by_seed(pl, "final_train_error")))
        + f"): degradation reproduced in {k}/{len(gaps)} seeds (training error higher by more than "
          f"{100 * GAP:.0f} point, {min(gaps) * 100:+.1f} to {max(gaps) * 100:+.1f} points)."))

    fixed = [err(a) <= err(b) + TIE and err(a) < err(c) - GAP for a, b, c in zip(
        by_seed(rh, "final_train_error"), by_seed(rl, "final_train_error"), by_seed(ph, "final_train_error"))]
    out.append(_claim(
        "shortcuts", f"shortcuts fix it: resnet-{hi} trains as well as resnet-{lo}", all(fixed),
        f"resnet-{hi} ends at {_pct(rh['final_train_error'], 2)} training error vs "
        f"{_pct(rl['final_train_error'], 2)} for resnet-{lo} and {_pct(ph['final_train_error'])} for its "
        f"plain twin (same parameters): within {100 * TIE:.0f} point of resnet-{lo} and below plain-{hi} "
        f"in {sum(fixed)}/{len(fixed)} seeds."))

    dt = (rh["final_test_error"] or 1.0) - (rl["final_test_error"] or 1.0)
    out.append(_claim(
        "deeper-better", f"with shortcuts, deeper is better (the paper: resnet-{hi} beats resnet-{lo})",
        dt < -GAP / 2,
        f"resnet-{hi}'s test error is {_pct(rh['final_test_error'])} vs {_pct(rl['final_test_error'])} for "
        f"resnet-{lo} ({100 * dt:+.1f} points): "
        + ("deeper is better here." if dt < -GAP / 2 else
           "deeper is not better here (a tie or worse): the data set is too small and easy for the "
           "extra depth to pay off.")))

    acc = lambda e: None if e is None else 1 - e  # noqa: E731
    out.append(_claim(
        "seed-accuracy", "the seed's \"20 layers -> 95%, 56 layers -> 85% accuracy\" (plain nets, test)",
        (pl["final_test_error"] or 1.0) + GAP < (ph["final_test_error"] or 1.0),
        f"Here plain-{lo} reaches {_pct(acc(pl['final_test_error']))} test accuracy and plain-{hi} "
        f"{_pct(acc(ph['final_test_error']))} (resnet-{lo} {_pct(acc(rl['final_test_error']))}, resnet-{hi} "
        f"{_pct(acc(rh['final_test_error']))})."))
    return out + _gradient_claims(result)


def _gradient_claims(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    nets = result["nets"]
    hi = max(n["depth"] for n in nets.values())
    plain, res = nets.get(net_name(hi, True)), nets.get(net_name(hi, False))
    if plain is None or res is None:
        return []
    P, R = net_name(hi, True), net_name(hi, False)
    out = []
    sp, sr = plain["signal_ratio_init"]["bn"], res["signal_ratio_init"]["bn"]
    wp, wr = plain["grad_ratio_init"]["bn"], res["grad_ratio_init"]["bn"]
    sp1, wp1 = plain["signal_ratio_epoch1"]["bn"], plain["grad_ratio_epoch1"]["bn"]
    sr1, wr1 = res["signal_ratio_epoch1"]["bn"], res["grad_ratio_epoch1"]["bn"]
    out.append(_claim(
        "vanishing-bn", f"\"the training signal vanishes\" before it reaches the early layers of {P} "
                        "(with BatchNorm, as trained)",
        None if sp is None else sp < VANISH,
        f"At initialisation the error signal at {P}'s stem is {_times(sp)} the top's and the stem's weight "
        f"gradient {_times(wp)} the last conv's (medians over seeds): the gradient {_direction(sp)}; "
        f"{R}: {_times(sr)} and {_times(wr)}. After the first epoch {P}'s error signal at the stem is "
        f"{_times(sp1)} the top's (it {_direction(sp1)}) and its stem's weight gradient {_times(wp1)} the last "
        f"conv's (it {_direction(wp1)}); {R}: {_times(sr1)} and {_times(wr1)}."))

    prof = result["gradient_flow"]["nets"]
    seed = result["gradient_flow"]["seed"]

    def profile(name: str) -> Dict[str, Any]:
        return prof.get(name, {}).get("no_bn", {}).get("init") or {}

    def median_norm(p: Dict[str, Any]) -> Optional[float]:
        return _median(p.get("conv_grad_norm") or [])

    def act_range(p: Dict[str, Any]) -> str:
        a = p.get("block_act_rms") or []
        return "n/a" if not a or a[0] is None or a[-1] is None else f"{a[0]:.2g} -> {a[-1]:.2g}"

    np_, nr = plain["signal_ratio_init"]["no_bn"], res["signal_ratio_init"]["no_bn"]
    div = sum(p["no_bn_diverged_in_epoch1"] for p in res["per_seed"])
    divp = sum(p["no_bn_diverged_in_epoch1"] for p in plain["per_seed"])
    n = len(res["per_seed"])
    out.append(_claim(
        "vanishing-no-bn", f"without BatchNorm the error signal vanishes before it reaches the early layers of {P}",
        None if np_ is None else np_ < VANISH,
        f"At initialisation the error signal at {P}'s stem is {_times(np_)} the top's: it {_direction(np_)}. "
        f"Forward, its activations' RMS goes {act_range(profile(P))} from the stem to the last block, and "
        f"every conv's weight gradient is small (median {_fmt(median_norm(profile(P)), '.2g')}; stem/last "
        f"{_times(plain['grad_ratio_init']['no_bn'])})"
        + (f"; the first epoch diverged in {divp}/{n} seeds" if divp else "")
        + f". {R} without BatchNorm goes the other way: error signal {_times(nr)} (it {_direction(nr)}), "
          f"activations {act_range(profile(R))}, median weight gradient "
          f"{_fmt(median_norm(profile(R)), '.2g')}; its first epoch at lr {result['settings']['lr']} "
          f"diverged in {div}/{n} seeds (seed {seed} shown in the profiles)."))

    closer = None if sp is None or sr is None else abs(math.log10(sr)) <= abs(math.log10(sp)) - 1
    out.append(_claim(
        "highway", f"the shortcuts carry the error signal back: it reaches {R}'s input far closer to its size "
                   f"at the top than in {P} (with BatchNorm, at initialisation)",
        closer,
        f"Stem/top error signal {_times(sr)} in {R} vs {_times(sp)} in {P}, which has the same parameters; "
        f"{R}'s {'stays' if sr is not None and VANISH <= sr <= EXPLODE else 'does not stay'} within "
        f"{EXPLODE:.0f}x (after the first epoch: {_times(sr1)})."))
    return out


# --------------------------------------------------------------------------- reports

def render_markdown(result: Dict[str, Any], figure: Optional[str] = "lesson.png") -> str:
    s, dev = result["settings"], result["device"]
    lines = ["# The lesson, reproduced: 3x3 stacks, degradation, shortcuts, gradient flow", ""]
    lines.append(f"{result['date']}, {dev['name']} ({dev['device']}, {dev['processes']} process(es) of "
                 f"{dev['threads']} thread(s)), torch "
                 f"{dev['torch']}, deeparch-kernels {dev['deeparch_kernels']}"
                 + (f" at {dev['git']['commit'][:10]}" if dev.get("git", {}).get("commit") else "")
                 + f": {result['seconds']:.1f} s wall, {result['cpu_seconds']:.1f} s CPU.")
    lines.append("")
    lines.append(f"Data: {s['data_description']}. Training: SGD momentum {s['momentum']}, weight decay "
                 f"{s['weight_decay']}, batch {s['batch_size']}, lr {s['lr']} divided by 10 after epochs "
                 f"{', '.join(map(str, s['milestones'])) or '(none)'} of {s['epochs']}, seeds "
                 f"{', '.join(map(str, s['seeds']))}, option-{s['shortcut']} shortcuts.")
    lines += ["", "## Conclusions", ""]
    for c in result["conclusions"]:
        mark = {True: "reproduced", False: "**not reproduced**", None: "not checked"}[c["reproduced"]]
        lines.append(f"- {c['claim']}: {mark}. {c['text']}")
    lines += ["", "## One big kernel or a stack of 3x3 (C = 64, stride 1, no bias)", "",
              "| | layers | weights | multiply-adds per output pixel | receptive field | ReLUs |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in result["table"]:
        lines.append(f"| {r['name']} | {r['layers']} | {r['params']:,} | {r['macs_per_pixel']:,} | "
                     f"{r['receptive_field']}x{r['receptive_field']} | {r['relus']} |")
    lines += ["", "## Degradation: plain vs residual nets (final epoch)", "",
              "| net | parameters | training error | test error | training loss | per seed (train / test error) |",
              "|---|---:|---:|---:|---:|---|"]
    for name, n in result["nets"].items():
        per = "; ".join(f"seed {p['seed']}: {_pct(p['final_train_error'], 2)} / {_pct(p['final_test_error'], 2)}"
                        + (f" (diverged at epoch {p['diverged_at']})" if p["diverged_at"] else "")
                        for p in n["per_seed"])
        lines.append(f"| {name} | {n['params']:,} | {_pct(n['final_train_error'], 2)} | "
                     f"{_pct(n['final_test_error'], 2)} | {_fmt(n['final_train_loss'], '.4f')} | {per} |")
    lines += ["", "## Gradient flow: how the gradient changes from the top to the input (median over seeds)", "",
              "Weight gradient: the stem conv's weight-gradient norm over the last conv's. Error signal: the "
              "RMS of the gradient reaching the stem's output over the one reaching the last block's output. "
              "> 1: it grows toward the input; < 1: it shrinks. Measured on one batch of "
              f"{result['gradient_flow']['batch']} training samples in training mode.", "",
              "| net | BatchNorm | weight gradient, init | after epoch 1 | error signal, init | after epoch 1 |",
              "|---|---|---:|---:|---:|---:|"]
    for name, n in result["nets"].items():
        for norm, label in (("bn", "yes"), ("no_bn", "no")):
            diverged = norm == "no_bn" and any(p["no_bn_diverged_in_epoch1"] for p in n["per_seed"])
            ep1 = lambda v: ("diverged" if diverged and v is None else _ratio(v))  # noqa: E731
            lines.append(f"| {name} | {label} | {_ratio(n['grad_ratio_init'][norm])} | "
                         f"{ep1(n['grad_ratio_epoch1'][norm])} | {_ratio(n['signal_ratio_init'][norm])} | "
                         f"{ep1(n['signal_ratio_epoch1'][norm])} |")
    if figure:
        lines += ["", f"![degradation and gradient flow]({figure})"]
    load = result.get("load_average") or {}
    if load.get("start"):
        lines += ["", f"Machine load average (1 min) {load['start'][0]:.2f} at the start, "
                      f"{load['end'][0]:.2f} at the end, on {dev['cpu_count']} cores."]
    return "\n".join(lines) + "\n"


def draw(result: Dict[str, Any], path: Path) -> Tuple[Optional[Path], Optional[str]]:
    """lesson.png: the ResNet paper's Figure 6 (plain panel, residual panel: training error
    dashed, test error solid, mean over seeds with the seeds' range shaded) over the gradient flow
    of the deepest nets (weight-gradient norm per conv, backward-signal RMS per block; with and
    without BatchNorm; at init solid, after the first epoch dashed). (None, why) without
    matplotlib."""
    from .bench.plots import _pyplot

    plt, why = _pyplot()
    if plt is None:
        return None, why
    nets = result["nets"]
    depths = sorted({n["depth"] for n in nets.values()})
    cmap = plt.get_cmap("viridis")
    colour = {d: ("tab:blue" if d == depths[0] else "tab:red" if d == depths[-1] else
                  cmap(i / max(1, len(depths) - 1))) for i, d in enumerate(depths)}
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(3, 2, figsize=(12, 13), sharey="row")
    top = 10.0
    for ax, plain in zip(axes[0], (True, False)):
        for d in depths:
            n = nets.get(net_name(d, plain))
            if n is None:
                continue
            per = [p["curves"] for p in n["per_seed"]]
            for key, style, width in (("train_error", "--", 1.3), ("test_error", "-", 2.2)):
                ep = n["curves"]["epoch"]
                mean = [None if v is None else 100 * v for v in n["curves"][key]]
                ax.plot(ep, [math.nan if v is None else v for v in mean], style, color=colour[d], lw=width,
                        label=net_name(d, plain) if key == "test_error" else None)
                lo = [min((100 * c[key][i] for c in per if i < len(c[key]) and c[key][i] is not None), default=math.nan)
                      for i in range(len(ep))]
                hi = [max((100 * c[key][i] for c in per if i < len(c[key]) and c[key][i] is not None), default=math.nan)
                      for i in range(len(ep))]
                if len(per) > 1:
                    ax.fill_between(ep, lo, hi, color=colour[d], alpha=0.15, lw=0)
                top = max([top] + [v for v in hi if not math.isnan(v)])
        ax.set_title(f"{'plain' if plain else 'residual (option ' + result['settings']['shortcut'] + ')'} nets"
                     f" on {result['settings']['data']}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("error (%): training dashed, test solid")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_tick_params(labelleft=True)
    axes[0][0].set_ylim(0, min(100.0, top * 1.05))  # one scale for both panels, as in Figure 6
    for ax in axes[0]:
        ax.legend(fontsize=8, loc="best", framealpha=0.9)
    flows = result["gradient_flow"]["nets"]
    hi_d = depths[-1]
    for row, (key, ylabel, xlabel) in enumerate((
            ("conv_grad_norm", "weight-gradient norm", "conv layer (0 = stem, input side)"),
            ("block_grad_rms", "error signal RMS (dL/d output)", "block output (0 = stem, input side)")), start=1):
        for ax, norm in zip(axes[row], ("bn", "no_bn")):
            for plain in (True, False):
                f = flows.get(net_name(hi_d, plain), {}).get(norm, {})
                for when, style in (("init", "-"), ("epoch1", "--")):
                    prof = f.get(when)
                    if not prof:
                        continue
                    ys = [math.nan if v is None or v <= 0 else v for v in prof[key]]
                    label = f"{net_name(hi_d, plain)}, {'at init' if when == 'init' else 'after epoch 1'}"
                    if all(math.isnan(v) for v in ys):
                        label += ": diverged, no values"
                    elif when == "epoch1" and f.get("init") and all(
                            a is not None and b is not None and a > 0 and b > 0 and abs(math.log(a / b)) < 0.1
                            for a, b in zip(prof[key], f["init"][key])):
                        label += " (on the init curve)"
                    ax.plot(range(len(ys)), ys, style, color="tab:red" if plain else "tab:blue", lw=1.6,
                            label=label)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.yaxis.set_tick_params(labelleft=True)
            ax.set_title(f"{'with' if norm == 'bn' else 'without'} BatchNorm: {ylabel.split(' (')[0]}")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8, loc="best", framealpha=0.9)
    fig.suptitle(f"The lesson reproduced ({result['device']['name']}, seeds "
                 f"{', '.join(map(str, result['settings']['seeds']))}; gradient flow: seed "
                 f"{result['gradient_flow']['seed']}, {result['gradient_flow']['batch']} samples)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, None


def write(result: Dict[str, Any], out: Path, plot: bool = True) -> Dict[str, Any]:
    """lesson.json, lesson.md and (matplotlib permitting) lesson.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written: Dict[str, Any] = {"json": out / "lesson.json", "markdown": out / "lesson.md", "png": None,
                               "png_skipped": None}
    written["json"].write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    png, why = draw(result, out / "lesson.png") if plot else (None, "--no-plot")
    written["png"], written["png_skipped"] = png, why
    written["markdown"].write_text(render_markdown(result, "lesson.png" if png else None))
    return written


# --------------------------------------------------------------------------- command line

def _ints(text: str, what: str, parser: argparse.ArgumentParser) -> List[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{what} {text!r}: expected comma-separated integers")
    if not vals:
        parser.error(f"{what} {text!r}: expected at least one integer")
    return list(dict.fromkeys(vals))


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="deeparch-bench lesson",
        description="The lesson this library grew from, reproduced with its fused modules: the 3x3-stack "
                    "table, plain vs residual CIFAR-style nets (the degradation problem, ResNet paper "
                    "Figure 6), gradient flow with and without BatchNorm, and conclusions computed from "
                    "the numbers. Writes lesson.json, lesson.md and lesson.png.")
    p.add_argument("--data", choices=("digits", "cifar10"), default="digits",
                   help="digits: scikit-learn's 8x8 digits (default, no download); cifar10: from --data-dir")
    p.add_argument("--data-dir", type=Path, help="folder holding cifar-10-batches-py (--data cifar10; never downloaded)")
    p.add_argument("--depths", default="20,56", help="comma list of depths 6n+2; each is trained plain and "
                                                     "residual (default 20,56)")
    p.add_argument("--seeds", default="0,1", help="comma list of seeds (default 0,1)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs (default {d.epochs})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"initial learning rate, divided by 10 after 50%% "
                                                          f"and 75%% of the epochs (default {d.lr})")
    p.add_argument("--momentum", type=float, default=d.momentum, help=f"SGD momentum (default {d.momentum})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--shortcut", choices=("A", "B"), default="A",
                   help="residual nets' shortcut where the width changes: A (zero padding, no parameters: "
                        "the default) or B (conv1x1 + BN)")
    p.add_argument("--train-samples", type=int, help="use only the first N training samples")
    p.add_argument("--test-samples", type=int, help="use only the first N test samples")
    p.add_argument("--grad-batch", type=int, default=d.grad_batch,
                   help=f"samples of the batch the gradient flow is measured on (default {d.grad_batch})")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, help="CPU threads per process (default 1 on a CPU: these nets "
                                               "are too small for more to help; torch's default on a GPU)")
    p.add_argument("--jobs", type=int, help="seeds trained at once, in forked processes (default on a Linux "
                                            "CPU: one per seed up to the cores; 1 on a GPU)")
    p.add_argument("--contiguous", action="store_true",
                   help="NCHW tensors and weights (default: channels_last, the faster layout here)")
    p.add_argument("--backend", default="auto", help="the fused modules' backend (default auto)")
    p.add_argument("--out", type=Path, default=Path("deeparch-results"),
                   help="directory for lesson.json, lesson.md, lesson.png (default ./deeparch-results)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--replot", type=Path, metavar="LESSON_JSON",
                   help="train nothing: rewrite lesson.md (conclusions recomputed from the stored numbers) "
                        "and lesson.png from a stored lesson.json into --out (default: beside it)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


def parse_settings(argv: Sequence[str]) -> Tuple[Settings, argparse.Namespace]:
    from .bench.env import device_from_arg
    from .nn.common import check_backend_name

    p = build_parser()
    a = p.parse_args(list(argv))
    depths = _ints(a.depths, "--depths", p)
    for dep in depths:
        if dep < 8 or (dep - 2) % 6:
            p.error(f"--depths: {dep} is not 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)")
    seeds = _ints(a.seeds, "--seeds", p)
    for flag, v, lo in (("--epochs", a.epochs, 1), ("--batch-size", a.batch_size, 2),
                        ("--train-samples", a.train_samples, 2), ("--test-samples", a.test_samples, 1),
                        ("--grad-batch", a.grad_batch, 2), ("--threads", a.threads, 1),
                        ("--jobs", a.jobs, 1)):
        if v is not None and v < lo:
            p.error(f"{flag} {v}: must be at least {lo}")
    for flag, v in (("--lr", a.lr), ("--momentum", a.momentum), ("--weight-decay", a.weight_decay)):
        if not (math.isfinite(v) and v >= 0) or (flag == "--lr" and v == 0):
            p.error(f"{flag} {v}: must be a finite number >= 0" + (" and > 0" if flag == "--lr" else ""))
    try:
        check_backend_name(a.backend)
    except ValueError as e:
        p.error(f"--backend: {e}")
    try:
        device = device_from_arg(a.device)
    except ValueError as e:
        p.error(str(e))
    if a.data_dir is not None and a.data != "cifar10":
        p.error("--data-dir is for --data cifar10")
    if a.jobs is not None and a.jobs > 1 and device.type != "cpu":
        p.error("--jobs > 1 is for the CPU (forked processes); a GPU runs the seeds one after another")
    threads = a.threads if a.threads is not None else (1 if device.type == "cpu" else None)
    s = Settings(data=a.data, data_dir=None if a.data_dir is None else str(a.data_dir), depths=depths,
                 seeds=seeds, epochs=a.epochs, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
                 batch_size=a.batch_size, shortcut=a.shortcut, train_samples=a.train_samples,
                 test_samples=a.test_samples, grad_batch=a.grad_batch, device=str(device),
                 threads=threads, jobs=a.jobs, channels_last=not a.contiguous, backend=a.backend)
    return s, a


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        s, a = parse_settings(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    log = (lambda m: None) if a.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if a.replot is not None:
        try:
            result = json.loads(a.replot.read_text())
            if result.get("schema") != SCHEMA:
                raise ValueError(f"schema {result.get('schema')!r}, expected {SCHEMA!r}")
        except (OSError, ValueError) as e:
            print(f"deeparch-bench lesson: --replot {a.replot}: not a lesson.json ({e})", file=sys.stderr)
            return 2
        result["conclusions"] = conclusions(result)  # a function of the stored numbers
        out = a.out if "--out" in argv else a.replot.parent
        out.mkdir(parents=True, exist_ok=True)
        png, why = draw(result, out / "lesson.png") if not a.no_plot else (None, "--no-plot")
        (out / "lesson.md").write_text(render_markdown(result, "lesson.png" if png else None))
        log(f"wrote {out / 'lesson.md'}" + (f" and {png}" if png else f" (no PNG: {why})"))
        return 0
    try:
        result = run(s, log)
    except LessonError as e:
        print(f"deeparch-bench lesson: {e}", file=sys.stderr)
        return 1
    written = write(result, a.out, plot=not a.no_plot)
    sys.stdout.write(render_markdown(result, None))
    log(f"wrote {written['json']}, {written['markdown']}"
        + (f" and {written['png']}" if written["png"] else f" (no PNG: {written['png_skipped']})"))
    log(f"done in {result['seconds']:.1f} s wall, {result['cpu_seconds']:.1f} s CPU")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
