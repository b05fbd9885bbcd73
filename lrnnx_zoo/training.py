"""The training engine: ``train(recipe)`` -> (model, metrics), deterministic per seed, optionally
distributed under ``torchrun``, writing a Hub-format checkpoint when given a directory.

Determinism: the seed fixes the initial weights (``torch.manual_seed``), the per-epoch shuffle
and the augmentation (their own ``torch.Generator``s), and deterministic algorithms are requested.

Distributed (``torchrun --nproc_per_node=N``; WORLD_SIZE/RANK/LOCAL_RANK set): every rank draws
the same global batch of ``batch_size`` examples and takes its contiguous 1/N slice, so each rank's
loss is a mean over an equal-size shard and DDP's gradient average is the mean over the global
batch: N processes give the weights of 1 process (to float rounding).  The last partial batch of
an epoch is dropped (always, also with one process) so every step has a full global batch.
Only rank 0 prints and writes the checkpoint.  The equivalence is exact (to rounding) for
recipes without dropout; with dropout each rank draws its own masks, so runs agree only in
distribution.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .data import augment_digit_shifts
from .models import ModelConfig, SequenceModel
from .recipes import DataSpec, Recipe, get_recipe


# -- data ------------------------------------------------------------------------------------------
@dataclass
class TaskData:
    """Tensors for one task.  Classification: x (n, L, 1), y (n,) int64.  Forecasting: x, y
    (n, L, 1) and mask_test (n, L) bool marking the scored predictions."""

    task: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    mask_test: Optional[Tensor]
    card: Dict[str, Any]  # the "dataset" entry of the model card
    augment: Optional[str] = None
    target: str = "next"  # forecasting: what y holds, see lrnnx_zoo.data.to_level


def load_task_data(recipe: Recipe) -> TaskData:
    """Load the data a recipe names, with its split recorded for the model card."""
    return load_data(recipe.data)


def load_data(spec: DataSpec) -> TaskData:
    """Load a data set by its spec; the card records the spec so the split can be rebuilt."""
    from . import data as D
    params = dict(spec.params)
    if spec.name == "digits":
        augment = params.pop("augment", None)
        if augment not in (None, "shift"):
            raise ValueError(f"digits augment must be None or 'shift', got {augment!r}")
        split = D.Split(**params)
        x_tr, y_tr, x_te, y_te = D.load_digits_sequences(split)
        card = {"name": "digits", "source": "scikit-learn bundled (UCI optical recognition of handwritten digits)",
                "split": {"seed": split.seed, "n_train": len(y_tr), "n_test": len(y_te)},
                "format": "8x8 images read row-major as 64-step sequences, pixels / 16", "spec": spec.to_dict()}
        if augment:
            card["augmentation"] = "random shifts of +-1 pixel per axis (training only)"
        return TaskData(spec.task, x_tr, y_tr, x_te, y_te, None, card, augment)
    split_keys = {"n_train", "n_val"}
    split = D.TimeSplit(**{k: v for k, v in params.items() if k in split_keys})
    fd = D.load_forecast_series(spec.name, split=split,
                                **{k: v for k, v in params.items() if k not in split_keys})
    return TaskData(spec.task, fd.x_train, fd.y_train, fd.x_test, fd.y_test, fd.mask_test,
                    {**fd.info, "spec": spec.to_dict()}, target=fd.target)


# -- distributed -----------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if world <= 1:
        return DistInfo(device=torch.device(device or ("cuda" if use_cuda else "cpu")))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), dev, owns)


def global_batches(n: int, batch_size: int, epoch: int, seed: int) -> Iterator[Tensor]:
    """Example indices of each global batch of one epoch; the last partial batch is dropped.

    The permutation depends only on (seed, epoch), so every rank draws the same global batches.
    """
    if n < batch_size:
        raise ValueError(f"the training set has {n} examples, fewer than one batch of {batch_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    for start in range(0, n - batch_size + 1, batch_size):
        yield perm[start:start + batch_size]


def rank_slice(batch_size: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous, equal share [rank * B/N, (rank + 1) * B/N) of a global batch of B."""
    if batch_size % world_size:
        raise ValueError(f"the global batch size ({batch_size}) must be divisible by the number of "
                         f"processes ({world_size}); pick --batch-size as a multiple of {world_size}")
    per_rank = batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


# -- optimisation ----------------------------------------------------------------------------------
def param_groups(model: SequenceModel, lr: float, weight_decay: float, ssm_lr: Optional[float]) -> List[Dict[str, Any]]:
    """AdamW groups: decayed matrices; undecayed biases/norms; the sequence layers' own parameters
    at ``ssm_lr`` without decay.  A parameter's ``_optim`` record ({"lr", "weight_decay"}, the S4
    ``register`` convention) overrides those defaults for that parameter."""
    layer_params = {id(p) for b in model.blocks for p in b.layer.parameters()}
    layer_lr = ssm_lr if ssm_lr is not None else lr
    groups: Dict[Tuple[float, float], List[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in layer_params:
            key = (layer_lr, 0.0)
        else:
            key = (lr, weight_decay if p.dim() >= 2 else 0.0)
        record = getattr(p, "_optim", {})
        key = (record.get("lr", key[0]), record.get("weight_decay", key[1]))
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "lr": g_lr, "weight_decay": g_wd} for (g_lr, g_wd), ps in groups.items()]


def warmup_cosine(warmup: int, total: int):
    """LR multiplier: linear 0 -> 1 over ``warmup`` steps, then cosine 1 -> 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def batch_loss(model: nn.Module, task: str, x: Tensor, y: Tensor) -> Tensor:
    """Mean loss over the batch (cross-entropy, or MSE over every position for forecasting)."""
    out = model(x)
    if task == "sequence-classification":
        return nn.functional.cross_entropy(out, y)
    return nn.functional.mse_loss(out, y)


# -- evaluation ------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: SequenceModel, data: TaskData, batch_size: int = 256) -> Dict[str, float]:
    """Test metrics of ``model`` on ``data`` (see :func:`score`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outs = [model(data.x_test[i:i + batch_size].to(device)).cpu() for i in range(0, len(data.x_test), batch_size)]
    model.train(was_training)
    return score(torch.cat(outs), data)


def score(out: Tensor, data: TaskData) -> Dict[str, float]:
    """Metrics of test outputs, however they were computed (PyTorch forward, a streamed graph).

    Classification (out: (n, classes)): test_accuracy, test_loss. Forecasting (out: (n, L, 1),
    normalised units, scored positions only): test_mse, test_mae and the naive last-value
    forecast's naive_test_mse, naive_test_mae.
    """
    from .data import forecast_errors, to_level
    out = torch.as_tensor(out)
    if data.task == "sequence-classification":
        return {"test_accuracy": (out.argmax(-1) == data.y_test).float().mean().item(),
                "test_loss": nn.functional.cross_entropy(out, data.y_test).item()}
    true = to_level(data.x_test, data.y_test, data.target)
    model_err = forecast_errors(to_level(data.x_test, out, data.target), true, data.mask_test)
    naive = forecast_errors(data.x_test, true, data.mask_test)
    return {"test_mse": model_err["mse"], "test_mae": model_err["mae"],
            "naive_test_mse": naive["mse"], "naive_test_mae": naive["mae"]}


def checkpoint_data(info: Dict[str, Any]) -> TaskData:
    """Rebuild the evaluation split a checkpoint records (``checkpoint_info["dataset"]["spec"]``)."""
    dataset = info.get("dataset") or {}
    spec = dataset.get("spec")
    split = dataset.get("split") or {}
    if spec is None and dataset.get("name") == "digits" and {"seed", "n_test"} <= set(split):
        spec = {"name": "digits", "params": {"seed": split["seed"], "n_test": split["n_test"]}}  # older records
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError("this checkpoint records no data spec (dataset.spec) to rebuild its evaluation split from; "
                         "checkpoints written by `lrnnx-zoo train` have one")
    return load_data(DataSpec(spec["name"], spec.get("params", {})))


# -- the loop --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Ask for deterministic kernels (warn instead of fail where an op has none), then restore."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_before = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_before)


def reproduce_command(recipe: Recipe, out_dir: str) -> str:
    """The CLI line that reproduces a run of ``recipe`` (the registered recipe plus overrides)."""
    cmd = f"lrnnx-zoo train {recipe.name} --out {out_dir} --seed {recipe.seed}"
    try:
        base = get_recipe(recipe.name)
    except KeyError:
        return cmd
    if recipe.optim.epochs != base.optim.epochs:
        cmd += f" --epochs {recipe.optim.epochs}"
    if recipe.optim.batch_size != base.optim.batch_size:
        cmd += f" --batch-size {recipe.optim.batch_size}"
    if recipe.max_steps != base.max_steps and recipe.max_steps is not None:
        cmd += f" --max-steps {recipe.max_steps}"
    return cmd


def train(recipe: Recipe | str, out_dir: Optional[str] = None, seed: Optional[int] = None,
          progress: bool = True, device: Optional[str] = None,
          command: Optional[str] = None) -> Tuple[SequenceModel, Dict[str, float]]:
    """Train ``recipe`` (a :class:`Recipe` or its name) and return (model in eval mode, test metrics).

    seed overrides the recipe's seed.  With ``out_dir`` rank 0 writes the checkpoint there with
    ``model.save_pretrained`` (config, safetensors weights, model card with metrics and the
    command that reproduces it; ``command`` overrides the one derived from the recipe).
    """
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    if seed is not None:
        import dataclasses
        recipe = dataclasses.replace(recipe, seed=seed)
    if out_dir is not None and not hasattr(SequenceModel, "save_pretrained"):
        raise RuntimeError("SequenceModel.save_pretrained is not available (lrnnx_zoo.hub not installed); "
                           "train without out_dir or install a complete lrnnx-zoo")
    dist_info = setup_distributed(device)
    try:
        with _deterministic():
            model, metrics, seconds, data_card = _run(recipe, dist_info, progress)
        if out_dir is not None and dist_info.is_main:
            _save(model, recipe, out_dir, data_card, metrics, seconds, command, dist_info.world_size)
        if dist_info.world_size > 1:
            torch.distributed.barrier()  # nobody exits (and tears down the group) before rank 0 has saved
    finally:
        if dist_info.owns_group:
            torch.distributed.destroy_process_group()
    return model, metrics


def _run(recipe: Recipe, di: DistInfo, progress: bool) -> Tuple[SequenceModel, Dict[str, float], float, Dict[str, Any]]:
    """The loop itself: returns (model, test metrics, training seconds, dataset card)."""
    data = load_task_data(recipe)
    opt_spec = recipe.optim
    torch.manual_seed(recipe.seed)  # initial weights and dropout masks
    model = SequenceModel(ModelConfig(**recipe.model)).to(di.device)
    net: nn.Module = model
    if di.rank > 0:  # distinct dropout masks per rank; rank 0 keeps the single-process stream
        torch.manual_seed(recipe.seed + 1_000_003 * di.rank)
    if di.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[di.device.index] if di.device.type == "cuda" else None)
    mine = rank_slice(opt_spec.batch_size, di.rank, di.world_size)
    optimizer = torch.optim.AdamW(param_groups(model, opt_spec.lr, opt_spec.weight_decay, opt_spec.ssm_lr))
    n = len(data.x_train)
    steps_per_epoch = n // opt_spec.batch_size
    total = steps_per_epoch * opt_spec.epochs
    if recipe.max_steps is not None:
        total = min(total, recipe.max_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(opt_spec.warmup_steps, total))
    aug_gen = torch.Generator().manual_seed(recipe.seed + 1)
    show = progress and di.is_main and sys.stderr.isatty()
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=recipe.name, disable=not show, dynamic_ncols=True)
    step, start = 0, time.perf_counter()
    model.train()
    for epoch in range(opt_spec.epochs):
        if step >= total:
            break
        for idx in global_batches(n, opt_spec.batch_size, epoch, recipe.seed):
            if step >= total:
                break
            x, y = data.x_train[idx], data.y_train[idx]
            if data.augment == "shift":
                x = augment_digit_shifts(x, aug_gen)  # on the global batch, so every rank draws alike
            x, y = x[mine].to(di.device), y[mine].to(di.device)
            loss = batch_loss(net, data.task, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if opt_spec.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), opt_spec.grad_clip)
            optimizer.step()
            schedule.step()
            step += 1
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    metrics = evaluate(model, data)
    if di.is_main and progress:
        print(f"{recipe.name}: {step} steps in {seconds:.0f} s; " +
              ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), file=sys.stderr)
    return model, metrics, seconds, data.card


def _save(model: SequenceModel, recipe: Recipe, out_dir: str, data_card: Dict[str, Any], metrics: Dict[str, float],
          seconds: float, command: Optional[str], world_size: int) -> None:
    o = recipe.optim
    notes = (f"Recipe {recipe.name!r}: {recipe.description}. AdamW lr={o.lr} (sequence-layer parameters "
             f"{o.ssm_lr if o.ssm_lr is not None else o.lr}, no decay), weight decay {o.weight_decay}, "
             f"{o.warmup_steps} warmup steps then cosine decay, {o.epochs} epochs, global batch {o.batch_size}, "
             f"grad clip {o.grad_clip}, seed {recipe.seed}; {seconds:.0f} s of training on "
             f"{world_size} process{'es' if world_size > 1 else ''}, torch {torch.__version__}, "
             f"{_device_name(model)}.")
    if recipe.task == "time-series-forecasting":
        notes += (" Forecast metrics are over the test targets in normalised units z (multiply an MSE by "
                  "std^2 for the series' own units); naive_* is the last-value forecast on the same targets.")
    model.save_pretrained(out_dir, task=recipe.task, dataset=data_card, metrics=metrics,
                          command=command or reproduce_command(recipe, out_dir), notes=notes)


def _device_name(model: nn.Module) -> str:
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    n = torch.get_num_threads()
    return f"CPU ({n} thread{'s' if n > 1 else ''})"
