"""PyTorch reference of one LightCL train step, to time against the JAX step.

    python -m benchmarks.torch_reference      # nf 64, 32x32x3, batch 32, buffer 15, 2 threads

A self-contained CIFAR ResNet-18 (NCHW, float32) and one LightCL step at a task
``t >= 1``: stem + stages 1-3 frozen (no gradients, not in the optimizer), stage 4
and the head trained by plain SGD on the task-masked cross-entropy plus the
regulation loss of the buffer's vital-channel taps and logits.

PyTorch is an optional benchmark extra, never a dependency of ``lightcl_jax``:
this module imports it only inside functions, so importing the module works
without it, and using it raises an ``ImportError`` that says how to install it.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

TORCH_MISSING = ("PyTorch is an optional benchmark extra: pip install torch==2.13.0 "
                 "(CPU build, from local files here)")


def _torch():
    """Imports torch lazily.

    Returns:
        The ``torch`` module.

    Raises:
        ImportError: torch is not installed, with the install hint.
    """
    try:
        import torch
    except ImportError as err:
        raise ImportError(TORCH_MISSING) from err
    return torch


def torch_device(name: str):
    """``torch.device(name)``, refused with a clear error where PyTorch cannot use it.

    Raises:
        ValueError: an unknown device name, or "cuda" where PyTorch sees no GPU.
    """
    torch = _torch()
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown PyTorch device {name!r}; e.g. 'cpu' or 'cuda'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"PyTorch device {name!r}: this PyTorch ({torch.__version__}) sees "
                         "no CUDA GPU; use 'cpu', or a CUDA build of torch on a GPU machine")
    return device


@functools.lru_cache(maxsize=None)
def _model_classes():
    """Defines the model classes on first use, so the module imports without torch.

    Returns:
        ``(BasicBlock, ResNet18)``, both ``torch.nn.Module`` subclasses.
    """
    torch = _torch()
    nn = torch.nn
    relu = torch.nn.functional.relu

    def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)

    class BasicBlock(nn.Module):
        """Two 3x3 conv + BN, with an identity or 1x1 conv + BN shortcut."""

        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = conv3x3(cin, cout, stride)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = conv3x3(cout, cout)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            """Returns ``(hidden, out)``: the first conv+BN+ReLU, and the block output."""
            hidden = relu(self.bn1(self.conv1(x)))
            out = relu(self.bn2(self.conv2(hidden)) + self.shortcut(x))
            return hidden, out

    class ResNet18(nn.Module):
        """CIFAR ResNet-18: 3x3 stem, no max-pool, stages of widths nf..8nf, linear head."""

        def __init__(self, nf: int = 64, channels: int = 3, num_classes: int = 10):
            super().__init__()
            self.conv1 = conv3x3(channels, nf)
            self.bn1 = nn.BatchNorm2d(nf)
            stages, cin = [], nf
            for width, stride in ((nf, 1), (2 * nf, 2), (4 * nf, 2), (8 * nf, 2)):
                stages.append(nn.ModuleList([BasicBlock(cin, width, stride),
                                             BasicBlock(width, width, 1)]))
                cin = width
            self.layer1, self.layer2, self.layer3, self.layer4 = stages
            self.linear = nn.Linear(8 * nf, num_classes)

        def frozen_modules(self) -> list:
            """The modules LightCL freezes at tasks >= 1: stem and stages 1-3."""
            return [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3]

        def forward(self, x):
            """Returns ``(logits, taps)``, taps the 4 maps of stage 4 (hidden, out per block)."""
            h = relu(self.bn1(self.conv1(x)))
            for stage in (self.layer1, self.layer2, self.layer3):
                for block in stage:
                    h = block(h)[1]
            taps = []
            for block in self.layer4:
                hidden, h = block(h)
                taps += [hidden, h]
            logits = self.linear(h.mean(dim=(2, 3)))
            return logits, taps

    return BasicBlock, ResNet18


def make_resnet18(nf: int = 64, channels: int = 3, num_classes: int = 10):
    """Builds the CIFAR ResNet-18.

    Args:
        nf: Width of the stem and stage 1; stages 2-4 are 2nf, 4nf, 8nf wide.
        channels: Input channels.
        num_classes: Outputs of the linear head.

    Returns:
        A ``torch.nn.Module`` whose forward returns ``(logits, taps)``.
    """
    return _model_classes()[1](nf=nf, channels=channels, num_classes=num_classes)


def vital_channel_count(num_channels: int, ratio: float = 0.15) -> int:
    """Number of vital channels kept for a tap of ``num_channels`` channels."""
    return int(ratio * num_channels + 0.5) + 1


class LightCLStep:
    """One LightCL train step at a task ``t >= 1``, with its model, optimizer and memory.

    Attributes:
        model: The ResNet-18, in train mode (BatchNorm on batch statistics everywhere).
        optimizer: ``torch.optim.SGD`` over stage 4 and the head only.
        buffer_x: Memory inputs, ``(buffer_size, C, H, W)``.
        ref_taps: Reference stage-4 taps of ``buffer_x``, taken when the memory was built.
        ref_logits: Reference logits of ``buffer_x``.
        masks: Per tap, a bool ``(C,)`` mask of its vital channels.
        beta: Weight of the regulation loss.
        task_index: The task ``t``.
        classes_per_task: Classes per task; the task's classes are ``t*cpt .. (t+1)*cpt-1``.
    """

    def __init__(self, model, optimizer, buffer_x, ref_taps, ref_logits, masks, beta: float,
                 task_index: int, classes_per_task: int):
        self.model = model
        self.optimizer = optimizer
        self.buffer_x = buffer_x
        self.ref_taps = ref_taps
        self.ref_logits = ref_logits
        self.masks = masks
        self.beta = beta
        self.task_index = task_index
        self.classes_per_task = classes_per_task

    def regulation(self, logits_b, taps_b):
        """Regulation loss: beta * (sum of masked squared tap drift + squared logit drift)."""
        reg = sum(((mask.view(1, -1, 1, 1) * (tap - ref)) ** 2).sum()
                  for mask, tap, ref in zip(self.masks, taps_b, self.ref_taps))
        return self.beta * reg + self.beta * ((logits_b - self.ref_logits) ** 2).sum()

    def __call__(self, x, y) -> float:
        """Runs one step on the batch ``(x, y)``, labels in the task's classes.

        Returns:
            The loss (cross-entropy + regulation) before the update.
        """
        torch = _torch()
        self.optimizer.zero_grad()
        logits_b, taps_b = self.model(self.buffer_x)  # buffer forward first
        reg = self.regulation(logits_b, taps_b)
        logits, _ = self.model(x)
        lo = self.task_index * self.classes_per_task
        ce = torch.nn.functional.cross_entropy(logits[:, lo:lo + self.classes_per_task], y - lo)
        loss = ce + reg
        loss.backward()
        self.optimizer.step()
        return loss.item()


def build_lightcl_step(nf: int = 64, image_size: int = 32, channels: int = 3,
                       num_classes: int = 10, classes_per_task: int = 2, batch_size: int = 32,
                       buffer_size: int = 15, lr: float = 0.01, beta: float = 2e-4,
                       ratio: float = 0.15, task_index: int = 1, seed: int = 0,
                       device: str = "cpu"):
    """Builds the model, the frozen/trained split, the memory and a fixed random batch.

    The memory is the first ``buffer_size`` samples of a random batch, with their
    reference taps and logits (no grad, train mode) and per tap the
    ``vital_channel_count`` channels of largest summed |activation| over it.

    Args:
        nf: Base width of the ResNet-18.
        image_size: Height and width of the square inputs.
        channels: Input channels.
        num_classes: Outputs of the head.
        classes_per_task: Classes per task.
        batch_size: Samples in the training batch.
        buffer_size: Samples in the memory buffer.
        lr: SGD learning rate (no momentum, no weight decay).
        beta: Weight of the regulation loss.
        ratio: Fraction of vital channels per tap.
        task_index: The task ``t >= 1`` whose step is built.
        seed: Seed of the initialization and of the random data.
        device: Where the model and data live (a ``torch.device`` name: "cpu", "cuda");
            the same weights and data on any (drawn on the CPU, then moved).

    Returns:
        ``(step, x, y)``: a ``LightCLStep`` and a fixed batch, ``x`` float32 NCHW and
        ``y`` int64 labels in the task's classes.
    """
    torch = _torch()
    if task_index < 1:
        raise ValueError(f"LightCL's step freezes layers at tasks >= 1, got {task_index}")
    device = torch_device(device)
    torch.manual_seed(seed)
    model = make_resnet18(nf=nf, channels=channels, num_classes=num_classes).to(device)
    model.train()
    frozen = {id(p) for m in model.frozen_modules() for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=lr, momentum=0.0, weight_decay=0.0)

    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size, channels, image_size, image_size)
    buffer_x = torch.randn(shape, generator=gen)[:buffer_size].contiguous().to(device)
    x = torch.randn(shape, generator=gen).to(device)
    lo = task_index * classes_per_task
    y = torch.randint(lo, lo + classes_per_task, (batch_size,), generator=gen).to(device)

    with torch.no_grad():
        ref_logits, ref_taps = model(buffer_x)
    masks = []
    for tap in ref_taps:
        num = tap.shape[1]
        vital = tap.abs().sum(dim=(0, 2, 3)).topk(vital_channel_count(num, ratio)).indices
        mask = torch.zeros(num, dtype=torch.bool, device=device)
        mask[vital] = True
        masks.append(mask)
    step = LightCLStep(model, optimizer, buffer_x, ref_taps, ref_logits, masks, beta,
                       task_index, classes_per_task)
    return step, x, y


class FullStep:
    """One step that trains every layer (task 0 without pre-training, finetune, the
    baselines): SGD on the cross-entropy over the task's logits, as the authors' ``train``."""

    def __init__(self, model, optimizer, task_index: int, classes_per_task: int):
        self.model, self.optimizer = model, optimizer
        self.task_index, self.classes_per_task = task_index, classes_per_task

    def __call__(self, x, y) -> float:
        torch = _torch()
        self.optimizer.zero_grad()
        logits, _ = self.model(x)
        lo = self.task_index * self.classes_per_task
        loss = torch.nn.functional.cross_entropy(logits[:, lo:lo + self.classes_per_task], y - lo)
        loss.backward()
        self.optimizer.step()
        return loss.item()


def build_full_step(nf: int = 64, image_size: int = 32, channels: int = 3,
                    num_classes: int = 10, classes_per_task: int = 2, batch_size: int = 32,
                    lr: float = 0.01, task_index: int = 0, seed: int = 0,
                    device: str = "cpu"):
    """``(step, x, y)``: a `FullStep` of a fresh ResNet-18 and a fixed random batch, on
    ``device`` (as `build_lightcl_step`)."""
    torch = _torch()
    device = torch_device(device)
    torch.manual_seed(seed)
    model = make_resnet18(nf=nf, channels=channels, num_classes=num_classes).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, channels, image_size, image_size), generator=gen).to(device)
    lo = task_index * classes_per_task
    y = torch.randint(lo, lo + classes_per_task, (batch_size,), generator=gen).to(device)
    return FullStep(model, optimizer, task_index, classes_per_task), x, y


def time_lightcl_step(steps: int = 5, warmup: int = 2, threads: int = 2,
                      **build_kwargs: Any) -> dict:
    """Times the LightCL step on a fixed batch.

    With ``threads`` equal to the core count, any other busy process slows the
    step many times over (each op ends at an OpenMP barrier): time on a quiet machine.

    Args:
        steps: Timed steps.
        warmup: Untimed steps run first.
        threads: ``torch.set_num_threads`` value (restored afterwards).
        **build_kwargs: Passed to ``build_lightcl_step``.

    Returns:
        ``{"median_s", "times_s", "threads", "torch_version"}``, seconds per step.
    """
    torch = _torch()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        step, x, y = build_lightcl_step(**build_kwargs)
        for _ in range(warmup):
            step(x, y)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step(x, y)  # .item() inside waits for the result
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return {"median_s": statistics.median(times), "times_s": times, "threads": threads,
            "torch_version": torch.__version__}


if __name__ == "__main__":
    result = time_lightcl_step()
    print(f"torch {result['torch_version']}, {result['threads']} threads: LightCL step median "
          f"{result['median_s'] * 1e3:.1f} ms over {len(result['times_s'])} steps "
          f"({', '.join(f'{t * 1e3:.1f}' for t in result['times_s'])} ms)")
