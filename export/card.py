"""The README.md card of an export folder: what it is, how it was made, how to run it."""

from __future__ import annotations

import json
import shlex
from typing import Any, Dict, List, Optional

from lrnnx_zoo.data import FORECAST_TARGETS
from lrnnx_zoo.hub import loadable_source
from lrnnx_zoo.hub_card import dataset_name, resampled_sentence

from .onnx_export import onnxruntime_needed
from .options import DEFAULT_OPSET, FOLDER_VALIDATION_LENGTH
from .provenance import is_number, recorded, source_of

_TAGS = {"onnx": ["onnx"], "torchscript": ["torchscript"], "torch-export": ["torch-export"]}


def _front_matter(config: Dict[str, Any]) -> str:
    tags = ["lrnnx-zoo", "state-space-model", "streaming", "step-graph", config["family"]] + _TAGS[config["format"]]
    lines = ["---", "library_name: lrnnx-zoo", "tags:"] + [f"- {t}" for t in tags]
    src = config.get("source_checkpoint") or {}
    if isinstance(src, dict) and src.get("repo_id"):
        lines.append(f"base_model: {src['repo_id']}")
    return "\n".join(lines + ["---", ""])


def _fixed_batch(config: Dict[str, Any]) -> Optional[int]:
    """The graph's fixed batch size, or None for a dynamic batch (config records "dynamic")."""
    return config["batch"] if isinstance(config.get("batch"), int) else None


def _made_with(config: Dict[str, Any]) -> List[str]:
    """The command and the export_folder call that remake this folder (from a folder named
    ``out``): the source is something from_pretrained loads (a shipped name, a Hub repo id at its
    commit, a folder path), and every setting that differs from the defaults is spelled out. A
    model not loaded as is (in memory, or fine-tuned since) gets the call only, with a placeholder."""
    src = config.get("source_checkpoint") or {}
    # weights changed since src was loaded (fine-tuned; "source" says so): loading src again makes another model
    resampled = config.get("resampled")
    same = config.get("source") == source_of({"source": src, "resampled": resampled})
    loadable = loadable_source(src) if same else None
    rate = None
    if isinstance(resampled, dict):      # SequenceModel.at_rate: remade from what it was resampled from
        loadable, rate = (resampled.get("from") if same else None), resampled.get("rate")
        if not is_number(rate):         # a record the card cannot spell as a call: the placeholder instead
            loadable, rate = None, None
    loadable = loadable if isinstance(loadable, str) else None      # a recorded name may be any JSON
    revision = ((recorded(src, "commit") or recorded(src, "revision"))
                if loadable and loadable == recorded(src, "repo_id") else None)
    opset = config.get("opset") if config["format"] == "onnx" and config.get("opset") != DEFAULT_OPSET else None
    length = (config.get("validation") or {}).get("length")
    length = length if length not in (None, FOLDER_VALIDATION_LENGTH) else None
    settings = [("revision", revision), ("batch", _fixed_batch(config)), ("opset", opset),
                ("quantize", "int8" if config.get("quantization") else None), ("validation_length", length),
                ("rate", rate), ("chunk", config.get("chunk"))]
    settings = [(k, v) for k, v in settings if v is not None]
    call = [repr(loadable or "<your checkpoint>"), "'out'", f"format={config['format']!r}"]
    call += [f"{k}={v!r}" for k, v in settings]
    python = ["```python", "from lrnnx_zoo.export import export_folder", "",
              f"export_folder({', '.join(call)})", "```", ""]
    if loadable is None:      # an in-memory (or fine-tuned) model: only Python can pass it
        return python
    flags = [f"--format {config['format']}", "--out out"]
    flags += [f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in settings]
    return ["```bash", f"lrnnx-zoo export {shlex.quote(loadable)} {' '.join(flags)}", "```", "",
            "or in Python:", ""] + python


def _dataset_record(config: Dict[str, Any]) -> Dict[str, Any]:
    """The checkpoint's dataset record as a dict ({} when it has none, or only a name string)."""
    data = config.get("dataset")
    return data if isinstance(data, dict) else {}


def _normalisation(config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The z-scoring the model's inputs had in training (the dataset record's mean and std), or None."""
    norm = _dataset_record(config).get("normalisation")
    numbers = isinstance(norm, dict) and all(is_number(norm.get(k)) for k in ("mean", "std"))
    return norm if numbers else None


def _forecast_target(config: Dict[str, Any]) -> Optional[str]:
    """What a z-scored forecaster's output holds: "next" (z_{t+1}) or "delta" (z_{t+1} - z_t, the
    forecast is input + output), from its data spec (lrnnx_zoo.data.load_forecast_series); else None."""
    if config.get("task") != "time-series-forecasting" or _normalisation(config) is None:
        return None
    # an absent spec or params means the default target; one of another JSON shape (a spec recorded
    # as a name string) says nothing, and the card leaves the detail out
    spec = _dataset_record(config).get("spec") or {}
    params = (recorded(spec, "params") or {}) if isinstance(spec, dict) else None
    target = params.get("target", "next") if isinstance(params, dict) else None
    return target if isinstance(target, str) and target in FORECAST_TARGETS else None


def _data_section(config: Dict[str, Any]) -> List[str]:
    """How the training data fed the model and what its outputs mean: a device must prepare its
    inputs the same way (a forecaster streamed raw values instead of z-scores was far off)."""
    data, task = _dataset_record(config), config.get("task")
    norm, target = _normalisation(config), _forecast_target(config)
    lines = []
    if data.get("format"):
        lines.append(f"- inputs: {data['format']}")
    if norm:
        lines.append(f"- inputs are normalised: `x = (value - mean) / std` with mean = {norm['mean']!r}, "
                     f"std = {norm['std']!r} (fitted on {norm.get('fitted_on', 'the training data')})")
    if target:
        lines.append("- output: z_{t+1} - z_t; the forecast of the next value is `(x + y) * std + mean`"
                     if target == "delta" else "- output: z_{t+1}; the forecast of the next value is `y * std + mean`")
    elif data.get("target"):
        lines.append(f"- output: {data['target']}")
    if task == "sequence-classification":
        lines.append(f"- output: {config['d_output']} class logits; a sequence's class is the argmax of `y` at "
                     f"its last step")
    if not lines:
        return []
    name = dataset_name(config.get("dataset"))
    heading = f"As in training (data set `{name}`):" if name else "As in training:"
    return (["## Inputs and outputs", "", heading, ""] + lines +
            ["", "The graph's metadata holds the data set's record (`lrnnx_zoo.dataset`, JSON) and the task "
                 "(`lrnnx_zoo.task`), and so does `config.json`.", ""])


def _stream_lines(config: Dict[str, Any], lib: str, call: str) -> List[str]:
    """A plain loop over 50 steps from a zero state, in numpy (``lib="np"``) or torch: z-scores its
    inputs and ends with the forecast in the series' units where the model was trained that way,
    and with the class for a classifier. ``meta``: the graph's lrnnx_zoo.* metadata, already read."""
    b, d_in, chunk = _fixed_batch(config) or 1, config["d_input"], config.get("chunk")
    norm, target = _normalisation(config), _forecast_target(config)
    zeros = (f'np.zeros(({b}, int(meta["lrnnx_zoo.state_size"])), np.float32)' if lib == "np"
             else f'torch.zeros({b}, int(meta["lrnnx_zoo.state_size"]))')
    # a chunk graph's call takes (batch, chunk, d_input): loop over chunks instead of steps
    calls, shape = (50, f"{b}, {d_in}") if not chunk else (max(2, 50 // chunk), f"{b}, {chunk}, {d_in}")
    what = "50 steps" if not chunk else f"{calls} chunks of {chunk} steps"
    randn = f"np.random.randn({calls}, {shape})" if lib == "np" else f"torch.randn({calls}, {shape})"
    f32 = ".astype(np.float32)" if lib == "np" else ".float()"
    lines = [f"state = {zeros}  # zeros = initial state"]
    if norm is None:
        lines += [f"xs = {randn}{f32}  # your inputs: {what}, batch {b}", "for x_t in xs:", f"    {call}"]
    else:
        lines = ['norm = json.loads(meta["lrnnx_zoo.dataset"])["normalisation"]  # the training data\'s mean, std'] + lines
        lines += [f'values = norm["mean"] + norm["std"] * {randn}  # your series: {what}, batch {b}',
                  "for v_t in values:",
                  f'    x_t = ((v_t - norm["mean"]) / norm["std"]){f32}  # normalised as in training', f"    {call}"]
    if target:
        level = "x_t + y_t" if target == "delta" else "y_t"
        lines.append(f'forecast = ({level}) * norm["std"] + norm["mean"]  # the next value'
                     + ("" if not chunk else " after each step of the last chunk") + ", in the series' units")
    if config.get("task") == "sequence-classification":
        last = "y_t" if not chunk else "y_t[:, -1]"
        lines.append(f"label = {last}.argmax(-1)  # each sequence's class (from the logits so far)")
    return lines


def _run_section(config: Dict[str, Any]) -> List[str]:
    fmt, d_in, b = config["format"], config["d_input"], _fixed_batch(config) or 1   # the snippets' batch
    imports = "import json, " if _normalisation(config) else "import "
    chunk = config.get("chunk")
    if chunk:
        streaming = [f"y = streamer.run(np.zeros(({b}, {4 * chunk}, {d_in}), np.float32))  # ({b}, {4 * chunk}, "
                     f"{config['d_output']}): 4 chunks of {chunk} steps; state kept inside",
                     f"# lengths must be multiples of {chunk}: stream the rest through a step graph of the same model",
                     "# (`lrnnx-zoo export` without --chunk), handing it streamer.state (the same layout)"]
    else:
        streaming = [f"y_t = streamer.step(np.zeros(({b}, {d_in}), np.float32))   # ({b}, {config['d_output']}); "
                     "state kept inside",
                     f"y = streamer.run(np.zeros(({b}, 100, {d_in}), np.float32)) # 100 steps, continuing"]
    if fmt == "onnx":
        graph = config.get("graph") or {}
        return ([
            "## Run it", "",
            f"Needs onnxruntime >= {onnxruntime_needed(config['opset'])} (opset {config['opset']}, IR version "
            f"{graph.get('ir_version')}); for an older one, export again with a lower `--opset`.", "",
            "With lrnnx-zoo's streamer (one thread, IOBinding, no per-step allocation):", "",
            "```python", "import numpy as np", "from lrnnx_zoo.export import OnnxStreamer", "",
            'streamer = OnnxStreamer("model.onnx")', f"streamer.reset(batch={b})"] + streaming + ["```", "",
            "With numpy and onnxruntime only (no torch, no lrnnx-zoo):", "",
            "```python", f"{imports}numpy as np, onnxruntime as ort", "",
            'sess = ort.InferenceSession("model.onnx")',
            "meta = sess.get_modelmeta().custom_metadata_map  # lrnnx_zoo.* keys, strings"]
            + _stream_lines(config, "np", 'y_t, state = sess.run(["y", "state_out"], {"x": x_t, "state": state})')
            + ["```", ""])
    loader = ('torch.export.load("model.pt2", extra_files=files).module()' if fmt == "torch-export"
              else 'torch.jit.load("model.ts", _extra_files=files)  # TorchScript is deprecated upstream; '
                   'prefer model.pt2')
    saved = config.get("torch_version")
    needs = ([f"Saved with torch {saved}: load it with that release or a newer one (a newer torch reads "
              f"older programs; an older one may not read this).", ""] if saved else [])
    loads = ("torch.jit.load compiles and runs the TorchScript code inside the file" if fmt != "torch-export" else
             "torch.export.load unpickles parts of the file with `weights_only=False`")
    trust = [f"**Loading this file runs code it carries** ({loads}): load it only from a source you trust, as "
             "you would install a Python package from it. For a graph from anyone else, use this model's ONNX "
             "export (`--format onnx`), which ONNX Runtime runs as data.", ""]
    return (["## Run it", ""] + needs + trust + ["With torch only (no lrnnx-zoo):", "", "```python", "import json, torch", "",
             'files = {"lrnnx_zoo.json": ""}  # filled in by the loader', f"step = {loader}",
             'meta = json.loads(files["lrnnx_zoo.json"])  # lrnnx_zoo.* keys, strings']
            + _stream_lines(config, "torch", "y_t, state = step(x_t, state)") + ["```", ""])


def build_card(config: Dict[str, Any]) -> str:
    """Markdown with YAML front matter for an export folder's config (see folder._config)."""
    fmt, v, lat, q = config["format"], config.get("validation"), config.get("latency"), config.get("quantization")
    pooling = config.get("pooling")
    bdim, chunk = _fixed_batch(config) or "batch", config.get("chunk")
    tdim = f"{chunk}, " if chunk else ""
    kind, advance = ("chunk", f"{chunk} time steps") if chunk else ("step", "one time step")
    out = [_front_matter(config), f"# {config['family']} {kind} graph ({fmt})", "",
           f"A recurrent {kind} graph exported by lrnnx-zoo {config['library_version']} from `{config['source']}`: "
           f"one call advances every layer by {advance},",
           "", f"    (x [{bdim}, {tdim}{config['d_input']}], state [{bdim}, {config['state_size']}]) -> "
               f"(y [{bdim}, {tdim}{config['d_output']}], state_out [{bdim}, {config['state_size']}])", "",
           "Start from a zero state and feed `state_out` back as `state`. "
           + ("Outputs are per step (sequence to sequence)." if pooling is None else
              f"The model is {pooling}-pooled: each step's output is the model's output on the sequence so far"
              + (" (the running mean and the step count live in the state: `pool.mean`, `pool.count`, and "
                 "`pool.carry` and `pool.count_carry` hold what rounding cut off their last updates)." if pooling == "mean" else ".")), ""]
    task, metrics = config.get("task"), config.get("metrics")
    if task or metrics:       # a fine-tuned model keeps its task but not the checkpoint's metrics
        out += [" ".join(([f"Task: {task}."] if task else [])
                         + ([f"Checkpoint metrics: `{json.dumps(metrics)}`."] if metrics else [])), ""]
    record = config.get("resampled")
    # hub_card's sentence formats the rate as a number: a record with another one gets no sentence
    resampled = resampled_sentence(record) if is_number(recorded(record, "rate")) else None
    if resampled:
        out += [resampled, ""]
    out += ["## How it was made", ""] + _made_with(config)
    if v:
        what = "The float32 graph was validated before int8 quantisation" if q else "Validated before writing"
        out += [f"{what}: streamed {v['length']} steps (batch {v['batch']}, {v['sequence']} "
                f"sequence) from a zero state and compared with the PyTorch model ({v['compared']}): max abs "
                f"error **{v['max_abs_error']:.2e}** (tolerance {v['tolerance']:.0e}).", ""]
    if q:
        over = f" over {q['sequences']} sequences streamed one at a time" if q.get("sequences") else ""
        out += [f"int8 dynamic quantisation: max abs output error {q['max_abs_error']:.3e}{over} (tolerance "
                f"{q['tolerance']:.3e}, {q['relative_tolerance']:.0%} of the largest output)."
                + (f" {q['metric']}: float {q['accuracy_float']:.4f}, int8 {q['accuracy_int8']:.4f} "
                   f"({q['accuracy_change']:+.4f})." if q.get("accuracy_float") is not None else "")
                + " Streams stepped together in one batch share the activations' int8 scale, so each one's "
                  "outputs depend a little on the others' (measured on the shipped digits graphs: logits up to "
                  "0.16 apart between one sequence alone and 360 together, up to 0.95 beside a sequence 100x "
                  "larger); stream independent users one per batch, or use the float graph."
                + (f" Note: {q['size_warning']}." if q.get("size_warning") else ""), ""]
    if lat and lat.get("chunk"):
        out += [f"Latency at batch {lat['batch']}: median {lat['median_us']:.1f} us per chunk of {lat['chunk']} steps, "
                f"{lat['per_step_us']:.2f} us per step ({lat['runtime']}, {lat['threads']} thread, {lat['steps']} "
                f"chunks; machine-dependent).", ""]
    elif lat:
        out += [f"Per-step latency at batch {lat['batch']}: median {lat['median_us']:.1f} us "
                f"({lat['runtime']}, {lat['threads']} thread, {lat['steps']} steps; machine-dependent).", ""]
    out += _data_section(config) + _run_section(config)
    out += ["## State layout", "", "| part | offset | size |", "|---|---|---|"]
    out += [f"| {name} | {off} | {size} |" for name, off, size in config["state_layout"]]
    out += ["", "Files: the graph, `step_form.safetensors` (the step module's weights by name, for auditing or "
                "porting to another runtime; in PyTorch, run a `.ts`/`.pt2` export, or rebuild the step with "
                "`lrnnx_zoo.export.build_step_module(lrnnx_zoo.from_pretrained(<source>))`, since some layers "
                "choose their step form from their weights), `config.json` (sizes, layout, validation, latency, "
                "source).", ""]
    return "\n".join(out)
