"""Where an export comes from: resolve the source model and describe it for graph metadata.

Every exporter accepts a SequenceModel or anything ``lrnnx_zoo.from_pretrained`` loads (a local
checkpoint folder, a shipped checkpoint name, a Hub repo id), and records in the artifact which
checkpoint it was made from, in the keys docs/export.md lists (``lrnnx_zoo.*``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple, Union

from torch import nn

import lrnnx_zoo
from lrnnx_zoo.hub import weights_changed
from lrnnx_zoo.hub_card import changes_text
from lrnnx_zoo.hub_save import RUN_KEYS
from lrnnx_zoo.utf8 import printable

from .step_graph import StepModule

Source = Union[nn.Module, str, os.PathLike]
META_PREFIX = "lrnnx_zoo."


def load_source(model_or_checkpoint: Source, revision: Optional[str] = None,
                token: Optional[Union[str, bool]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Return (model, checkpoint_info) for a model or a checkpoint reference.

    A model passed in is used as is (never switched to eval mode here: the step module is built
    from an eval-mode copy, and validation restores the model's mode).

    ``checkpoint_info`` is the loaded checkpoint's config (family, task, dataset, metrics, source),
    or ``{}`` for an in-memory model that did not come from a checkpoint. If the weights changed
    since it was recorded (fine-tuning), its metrics, command and notes are left out and
    ``"weights_changed"`` is True.
    """
    if isinstance(model_or_checkpoint, (str, os.PathLike)):   # just loaded: its weights are the checkpoint's
        model = lrnnx_zoo.from_pretrained(model_or_checkpoint, revision=revision, token=token)
        return model, dict(model.checkpoint_info)
    if not isinstance(model_or_checkpoint, nn.Module):
        raise TypeError(f"expected a SequenceModel, a checkpoint folder, a shipped checkpoint name or a Hub "
                        f"repo id; got {type(model_or_checkpoint).__name__}")
    model = model_or_checkpoint
    info = dict(getattr(model, "checkpoint_info", None) or {})
    if weights_changed(model, info):
        # fine-tuned since it was loaded or trained: that run's metrics no longer describe these weights
        info = {k: v for k, v in info.items() if k not in RUN_KEYS}
        info["weights_changed"] = True
    return model, info


def family_of(model: nn.Module, info: Dict[str, Any]) -> str:
    """The layer family's registered name, for the record only (export never branches on it)."""
    layer = getattr(getattr(model, "config", None), "layer", "") or ""
    return str(info.get("family") or layer.rpartition(":")[2] or type(model).__name__)


def recorded(value: Any, *keys: str) -> Any:
    """``value[k1][k2]...`` of a recorded JSON value (a checkpoint's config.json, the exporter's config),
    or None where a key is missing or a level is not a dict: the record may hold any JSON shape, and a
    ``"spec": "sunspots"`` in a dataset record crashed the card writer after the graph was validated."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def is_number(value: Any) -> bool:
    """A real number as JSON records one (not a bool, a string or null)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def rate_text(rate: Any) -> str:
    """A recorded resampling rate as the card and the source line print it: ``2`` for 2.0, else its repr
    (a rate recorded as "2" or null failed the ``:g`` format)."""
    return f"{rate:g}" if is_number(rate) else repr(rate)


def source_of(info: Dict[str, Any]) -> str:
    """A one-line description of the checkpoint: its repo id and commit, shipped name, or local folder's
    name ("local:NAME")."""
    record = info.get("resampled")
    if isinstance(record, dict):      # SequenceModel.at_rate: the source's system at another rate
        rest = source_of({k: v for k, v in info.items() if k != "resampled"})
        return f"{rest} (resampled at rate {rate_text(record.get('rate'))})"
    src = info.get("source")
    base = info.get("base_model")
    if not src and isinstance(base, dict) and isinstance(base.get("changes"), dict):
        # SequenceModel.reconfigure: in memory, its backbone from a checkpoint (a saved one has a source)
        changed = changes_text(base["changes"])
        origin = base.get("from") if isinstance(base.get("from"), str) else "an in-memory model"
        return f"in-memory model adapted from {origin} ({changed})"
    if not src:
        return "in-memory model (not loaded from a checkpoint)"
    if info.get("weights_changed"):
        return source_of({"source": src}) + " (weights changed since)"
    if isinstance(src, dict):
        if src.get("repo_id"):
            rev = src.get("commit") or src.get("revision")
            return f"hf://{src['repo_id']}" + (f"@{rev}" if rev else "")
        if src.get("name"):
            return f"shipped:{src['name']}"
        if src.get("path"):
            # the folder's name, not its path: the description travels with the graph to every device
            # and Hub repo, and named the exporting machine's folders (/home/<user>/...)
            return f"local:{printable(os.path.basename(os.path.normpath(str(src['path']))))}"
        return json.dumps(src, sort_keys=True)
    return str(src)


def graph_metadata(step: StepModule, model: nn.Module, info: Dict[str, Any],
                   extra: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """The ``lrnnx_zoo.*`` key/value strings stored in every exported artifact."""
    meta = {
        "state_size": step.state_size,
        "state_layout": json.dumps(step.state_layout),
        "d_input": step.d_input,
        "d_output": step.d_output,
        "family": family_of(model, info),
        "version": lrnnx_zoo.__version__,
        "source": source_of(info),
        "pooling": step.pooling or "none",
        "model_config": json.dumps(model.config.to_dict(), sort_keys=True),
    }
    # what a device needs to prepare inputs without lrnnx_zoo (a forecaster's z-scoring, a classifier's
    # pixel scale): the checkpoint's data set record and task, where it has them
    meta.update({k: info[k] for k in ("task", "dataset") if info.get(k)})
    meta.update(extra or {})
    return {META_PREFIX + k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()}
