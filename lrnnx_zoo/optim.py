"""Per-parameter optimiser settings ("records"): a learning rate and/or weight decay that a layer asks
for one of its parameters, honoured when optimiser parameter groups are built.

The convention comes from the S4 code: ``register(name, tensor, trainable, lr, wd)`` leaves a dict
``{"lr": ..., "weight_decay": ...}`` as the attribute ``_optim`` of the parameter.  A tensor attribute
alone does not survive ``copy.deepcopy`` (``nn.Parameter.__deepcopy__`` copies the data, not the
attributes), so :func:`set_optim_record` also keeps the record on the owning module, keyed by the
parameter's name, where deepcopy, pickling and ``load_state_dict(assign=True)`` keep it; readers go
through :func:`optim_records`, which looks at both.

:func:`grouped_parameters` is the one implementation of "parameter groups honouring the records",
behind both ``lrnnx_zoo.training.param_groups`` and the S4 plugin's ``optimizer_param_groups``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

#: The tensor attribute of the S4 convention (third-party layers may set it directly).
TENSOR_ATTR = "_optim"
#: The module attribute {parameter name: record} that :func:`set_optim_record` keeps.
MODULE_ATTR = "_optim_records"
#: The keys a record may hold.
RECORD_KEYS = ("lr", "weight_decay")


def check_optim_values(who: str, **values: Any) -> None:
    """Raise unless every value is None or a finite number >= 0 (a learning rate, a weight decay). The
    optimisers check only their own defaults, never a group's: lr=-1e-2 trained uphill (the loss
    1.5 -> 14 in three steps), NaN made the weights NaN and a str failed inside the first step."""
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{who} needs {name} to be a number >= 0 (or None), got {value!r} "
                            f"({type(value).__name__})")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{who} needs {name} to be a finite number >= 0 (or None), got {value!r}")


def set_optim_record(module: nn.Module, name: str, record: Optional[Dict[str, float]]) -> None:
    """Record (or with an empty/None ``record``, forget) the optimiser settings of ``module``'s own
    parameter ``name``: on the module, and as the parameter's ``_optim`` attribute."""
    unknown = set(record or {}) - set(RECORD_KEYS)
    if unknown:
        raise ValueError(f"an optimiser record holds only {RECORD_KEYS}, got the keys {sorted(unknown)}")
    check_optim_values(f"the optimiser record of {type(module).__name__}.{name}", **(record or {}))
    records: Dict[str, Dict[str, float]] = module.__dict__.setdefault(MODULE_ATTR, {})
    param = module._parameters.get(name)
    if not record:
        records.pop(name, None)
        if param is not None and hasattr(param, TENSOR_ATTR):
            delattr(param, TENSOR_ATTR)
        return
    if param is None:
        raise ValueError(f"{type(module).__name__} has no parameter {name!r} to record optimiser settings for "
                         f"(parameters: {sorted(module._parameters)}); register it as a parameter first")
    records[name] = dict(record)
    setattr(param, TENSOR_ATTR, dict(record))


def optim_records(model: nn.Module) -> Dict[int, Dict[str, Any]]:
    """``id(parameter) -> record`` for every parameter of ``model`` that has one.

    The parameter's own ``_optim`` attribute wins (it is what the convention documents, and what a
    third-party layer may have set); else the record its module keeps, which is the one a deepcopy
    still has.  A parameter shared by several modules takes the first record found.
    """
    found: Dict[int, Dict[str, Any]] = {}
    for module in model.modules():
        kept = module.__dict__.get(MODULE_ATTR) or {}
        for name, param in module.named_parameters(recurse=False):
            record = getattr(param, TENSOR_ATTR, None) or kept.get(name)
            if record and id(param) not in found:
                found[id(param)] = dict(record)
    return found


def grouped_parameters(model: nn.Module, default: Callable[[nn.Parameter], Tuple[float, Optional[float]]]
                       ) -> List[Dict[str, Any]]:
    """Optimiser parameter groups of ``model``'s trainable parameters (each shared one once).

    ``default(p)`` gives a parameter's (lr, weight_decay); its record (:func:`optim_records`)
    overrides either.  Parameters with the same pair share a group, in order of first appearance;
    frozen ones (requires_grad False) are left out.  Pass the result to any torch optimiser.  A
    weight_decay of None leaves the key out of its group, so the optimiser's own argument applies.
    """
    records = optim_records(model)
    groups: Dict[Tuple[float, float], List[nn.Parameter]] = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        lr, weight_decay = default(param)
        record = records.get(id(param), {})
        key = (record.get("lr", lr), record.get("weight_decay", weight_decay))
        groups.setdefault(key, []).append(param)
    for lr, weight_decay in groups:          # once per group; a record set by hand on a tensor too
        check_optim_values("a parameter group", lr=lr, weight_decay=weight_decay)
    return [{"params": ps, "lr": lr, **({} if wd is None else {"weight_decay": wd})} for (lr, wd), ps in groups.items()]
