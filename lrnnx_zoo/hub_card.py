"""The model card (README.md) of a checkpoint: Hub metadata up front, then what a reader needs.

The YAML front matter is built with huggingface_hub's ``ModelCardData`` / ``EvalResult`` so the
Hub indexes it (library, tags, datasets, a ``model-index`` with the metrics); the body is ours:
task, data and split, metrics, the command that made it, how to load it and how to export it.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional

from .registry import release_of

TAGS = ("state-space-model", "linear-recurrence", "lrnnx-zoo")


def task_name(task: Any) -> Optional[str]:
    """A task given as a string or as a dict with "name"/"type" -> its name (None if not given)."""
    if task is None or isinstance(task, str):
        return task
    if isinstance(task, dict):
        return task.get("name") or task.get("type")
    return str(task)


def dataset_name(dataset: Any) -> Optional[str]:
    if dataset is None or isinstance(dataset, str):
        return dataset
    return dataset.get("name") if isinstance(dataset, dict) else str(dataset)


def scalar_metrics(metrics: Optional[Dict[str, Any]]) -> Dict[str, float]:
    """The numeric entries of a metrics dict, in their order (the card lists only these)."""
    out: Dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


#: Words of a metric's name that say its split ("naive_test_mse" -> test, "val_loss" -> validation).
SPLIT_WORDS = {"test": "test", "val": "validation", "valid": "validation", "validation": "validation",
               "dev": "validation", "train": "train", "training": "train"}
#: The keys a dataset's "split" record may use for each split (lrnnx_zoo.data writes "val").
SPLIT_KEYS = {"test": ("test",), "validation": ("val", "validation", "valid"), "train": ("train",)}


def metric_split(name: str) -> Optional[str]:
    """The split ("train", "validation", "test") a metric was measured on, as its name says it
    (test_accuracy, naive_test_mse, val_loss, train_loss); None when the name says none, or several."""
    found = {SPLIT_WORDS[w] for w in re.split(r"[^a-z0-9]+", name.lower()) if w in SPLIT_WORDS}
    return found.pop() if len(found) == 1 else None


def split_detail(split: str, dataset: Any) -> str:
    """``split`` with what the dataset record says of it: "test (360 examples)" from a count
    (``n_test``), "test (1980-01 to 2009-06)" from a period, else just the split's name."""
    record = dataset.get("split") if isinstance(dataset, dict) else None
    if not isinstance(record, dict):
        return split
    for key in SPLIT_KEYS[split]:
        count, part = record.get(f"n_{key}"), record.get(key)
        if isinstance(count, int) and not isinstance(count, bool):
            return f"{split} ({count} examples)"
        dates = part.get("dates") if isinstance(part, dict) else None
        if isinstance(dates, list) and len(dates) == 2:
            return f"{split} ({dates[0]} to {dates[1]})"
    return split


def headline_metric(metrics: Optional[Dict[str, Any]]) -> Optional[str]:
    """The metric to show in one line: the first test metric, else the first numeric one."""
    numeric = scalar_metrics(metrics)
    if not numeric:
        return None
    key = next((k for k in numeric if k.startswith("test")), next(iter(numeric)))
    return f"{key}={numeric[key]:.4g}"


def build_card(config: Dict[str, Any], name: str, n_parameters: Optional[int] = None, load_as: Optional[str] = None,
               revision: Optional[str] = None) -> Any:
    """A ``huggingface_hub.ModelCard`` for the checkpoint described by ``config`` (config.json's dict).

    ``name`` is what users pass to ``from_pretrained``: a shipped model name or a Hub repo id.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    family = config["family"]
    task, data = task_name(config.get("task")), dataset_name(config.get("dataset"))
    metrics = scalar_metrics(config.get("metrics"))
    evals = None
    if metrics and task and data:  # model-index needs all three
        evals = [EvalResult(task_type=task, dataset_type=data, dataset_name=data, metric_type=k,
                            metric_value=v, dataset_split=metric_split(k)) for k, v in metrics.items()]
    card_data = ModelCardData(
        library_name="lrnnx-zoo", tags=[family, *TAGS] + ([task] if task else []),
        datasets=[data] if data else None, metrics=list(metrics) or None,
        model_name=name if evals else None, eval_results=evals)
    body = "\n".join(_body(config, name, n_parameters, load_as or name, revision))
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def resampled_sentence(record: Any) -> Optional[str]:
    """The card's sentence for a ``resampled`` record ({"rate", "from", "from_metrics"}, written by
    :meth:`~lrnnx_zoo.models.SequenceModel.at_rate`), or None when there is none."""
    if not isinstance(record, dict):
        return None
    origin = f"`{record['from']}`" if record.get("from") else "an in-memory model"
    metrics = record.get("from_metrics") or {}
    measured = ""
    if isinstance(metrics, dict) and metrics:
        listed = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        measured = f" The metrics of {origin} ({listed}) were measured at its own sampling rate, not this model's."
    return (f"Resampled from {origin} at rate {record.get('rate'):g}: the same continuous-time system run on inputs "
            f"with {record.get('rate'):g}x the samples per unit time (its step dt divided by the rate).{measured}")


def changes_text(changes: Any) -> str:
    """A ``base_model`` record's {field: [old, new]} as "d_output 10 -> 5, pooling 'mean' -> None" (an
    entry that is no [old, new] pair, edited by hand, as "field value"); "" for none. The card's and an
    export's source line (:func:`~lrnnx_zoo.export.provenance.source_of`) word it alike."""
    if not isinstance(changes, dict):
        return ""
    return ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" if isinstance(v, list) and len(v) == 2 else f"{k} {v!r}"
                     for k, v in changes.items())


def base_model_sentence(record: Any) -> Optional[str]:
    """The card's sentence for a ``base_model`` record ({"from", "from_metrics", "changes",
    "reinitialized"}, written by :meth:`~lrnnx_zoo.models.SequenceModel.reconfigure`), or None."""
    if not isinstance(record, dict):
        return None
    origin = f"`{record['from']}`" if record.get("from") else "an in-memory model"
    changed = changes_text(record.get("changes"))
    fresh = record.get("reinitialized") or []
    text = f"Adapted from {origin}" + (f" ({changed})" if changed else "") + ": its backbone's weights were loaded"
    text += (f"; {', '.join(f'`{n}`' for n in fresh)} were initialised afresh, not loaded." if fresh else ".")
    metrics = record.get("from_metrics") or {}
    if isinstance(metrics, dict) and metrics:
        listed = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        text += f" The metrics of {origin} ({listed}) are that model's, on its own task, not this one's."
    return text


def _body(cfg: Dict[str, Any], name: str, n_parameters: Optional[int], load_as: str, revision: Optional[str]
          ) -> List[str]:
    """The card's text. ``load_as``: what from_pretrained and `lrnnx-zoo export` are given to load it
    (a Hub id, a shipped name, or a folder's path), at ``revision`` (a branch pushed to) if any."""
    model, plugin = cfg["model"], cfg.get("plugin") or {}
    size = f", {n_parameters:,} parameters" if n_parameters is not None else ""
    lines = [f"# {name}", "",
             f"A sequence model on the `{cfg['family']}` layer: {model['n_layers']} residual "
             f"block{'' if model['n_layers'] == 1 else 's'} of width "
             f"{model['d_model']}{size}, made with lrnnx-zoo {cfg.get('library_version')}. The layer comes "
             f"from the plugin `{plugin.get('name')}` ({release_of(plugin)})."]
    for extra in cfg.get("extra_plugins") or []:   # loading needs these too (registry.extra_plugins)
        used = ", ".join(f"`{n}`" for n in extra.get("names") or [])
        lines[-1] += f" It uses {used} from the plugin `{extra.get('name')}` ({release_of(extra)}), which loading needs too."
    lines += ["", "## Task", ""]
    shape_out = ("one output of width {d} per sequence ({p} pooling)".format(d=model["d_output"], p=model["pooling"])
                 if model.get("pooling") else f"one output of width {model['d_output']} per time step")
    lines += [f"{task_name(cfg.get('task')) or 'Not recorded.'}", "",
              f"Input: sequences of shape (batch, length, {model['d_input']}); output: {shape_out}.", ""]
    lines += ["## Data and split", ""] + _describe(cfg.get("dataset")) + [""]
    lines += ["## Metrics", ""]
    metrics = cfg.get("metrics") or {}
    if metrics:
        lines += ["| metric | value | split |", "| --- | --- | --- |"]
        for k, v in metrics.items():
            split = metric_split(k)
            where = split_detail(split, cfg.get("dataset")) if split else "not recorded"
            lines.append(f"| {k} | {v:.4f} | {where} |" if isinstance(v, float) else f"| {k} | {v} | {where} |")
    else:
        lines.append("Not recorded.")
    lines += ["", "## How it was made", ""]
    command = cfg.get("command")
    threads = re.search(r"\bCPU \((\d+) threads?\)", str(cfg.get("notes") or ""))
    if command and threads and not command.lstrip().startswith("#"):
        # float32 sums split over another number of threads round differently: the command as typed
        # on a 2-core machine gave other bytes than a 1-thread run's weights
        lines += ["Reproduce it with (the run's CPU thread count gives the same bytes; other thread counts, "
                  "torch releases or devices round differently and train to slightly different weights):", "",
                  "```bash",
                  f"OMP_NUM_THREADS={threads.group(1)} {command}", "```"]
    else:
        lines += ["Reproduce it with:", "", "```bash", command, "```"] if command else ["The command was not recorded."]
    resampled = resampled_sentence(cfg.get("resampled"))
    if resampled:
        lines += ["", "## Sampling rate", "", resampled]
    base = base_model_sentence(cfg.get("base_model"))
    if base:
        lines += ["", "## Base model", "", base]
    if cfg.get("notes"):
        lines += ["", "## Notes", "", str(cfg["notes"])]
    # quoted for Python and the shell: a folder's path may hold spaces and quotes
    rev_py = f", revision={json.dumps(revision)}" if revision else ""
    rev_sh = f" --revision {shlex.quote(revision)}" if revision else ""
    lines += ["", "## How to load it", "", "```python", "import lrnnx_zoo", "",
              f"model = lrnnx_zoo.from_pretrained({json.dumps(load_as, ensure_ascii=False)}{rev_py})"
              "  # eval mode, weights checked strictly", "```", "", "## Export", ""]
    if (model.get("layer_kwargs") or {}).get("bidirectional"):
        lines += ["None: the model is bidirectional (its output at a step depends on later inputs), so it cannot "
                  "run step by step as a step graph does.", ""]
    else:
        lines += ["A recurrent step graph (x_t, state) -> (y_t, state') for ONNX Runtime:", "",
                  "```bash", f"lrnnx-zoo export {shlex.quote(load_as)}{rev_sh} --format onnx --out DIR", "```", ""]
    lines += ["## Configuration", "", "```json", json.dumps(model, indent=2, sort_keys=True), "```", ""]
    return lines


def _describe(dataset: Any) -> List[str]:
    if not dataset:
        return ["Not recorded."]
    if not isinstance(dataset, dict):
        return [str(dataset)]
    lines = []
    for key, value in dataset.items():
        if isinstance(value, dict):   # deeper records (e.g. the spec that rebuilds the split) as JSON
            value = ", ".join(f"{k} = {json.dumps(v) if isinstance(v, (dict, list)) else v}"
                              for k, v in value.items())
        lines.append(f"- {key}: {value}")
    return lines


def card_metrics(readme: Path) -> Dict[str, Any]:
    """The metrics recorded in a model card's ``model-index`` (empty if none or no card); a card larger
    than :data:`~lrnnx_zoo.hub.MAX_CARD_BYTES` (what a Hub download fetches) is not read."""
    from huggingface_hub import ModelCard

    from .hub import MAX_CARD_BYTES
    if not readme.is_file():
        return {}
    size = readme.stat().st_size
    if size > MAX_CARD_BYTES:      # `lrnnx-zoo info` read a 3 GB (sparse) card whole
        raise UnreadableCardError(f"{readme} (the model card) is {size / 1e6:.0f} MB, expected at most "
                                  f"{MAX_CARD_BYTES / 1e6:.0f} MB (a few kB as lrnnx-zoo writes it); it is not read")
    try:
        card = ModelCard.load(readme, ignore_metadata_errors=True)
        return {r.metric_type: r.metric_value for r in (card.data.eval_results or [])}
    except (ValueError, LookupError, TypeError, AttributeError, RecursionError, OSError, yaml_errors()) as exc:
        # ignore_metadata_errors covers neither YAML syntax, a list as front matter, non-UTF-8 bytes nor
        # deep nesting: `lrnnx-zoo info` and `evaluate` printed tracebacks for cards from_pretrained loads past;
        # OSError: a card this user may not read (from_pretrained never opens it), also a traceback before
        raise UnreadableCardError(f"{readme} (the model card) cannot be read: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc


class UnreadableCardError(ValueError):
    """A model card whose metadata cannot be parsed (the checkpoint itself may load fine)."""


def yaml_errors() -> type:
    """PyYAML's base error (huggingface_hub parses cards with it), or a stand-in when it is absent."""
    try:
        import yaml
        return yaml.YAMLError
    except ImportError:        # pragma: no cover - huggingface_hub depends on it
        return ValueError
