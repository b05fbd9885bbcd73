"""Every concrete reference the user documentation (README.md and every docs/*.md page) makes, checked
against the code by introspection: the files and folders it names exist, the flags it shows belong to
the command or script it shows them with, the environment variables it names are read, the shipped
checkpoints' metrics are the recorded ones, the defaults and limits its prose states are the code's
constants, its methods and keywords exist, and its relative links lead to a file and heading that exist.

(test_readme.py runs the snippets, parses the `lrnnx-zoo` command lines and resolves the
`lrnnx_zoo.`-qualified names; this file covers what those leave out. All of it is static: ~2 s.)
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import shlex
import signal
from pathlib import Path

import pytest

import lrnnx_zoo
from lrnnx_zoo.cli import build_parser
from test_readme import user_docs

ROOT = Path(__file__).resolve().parents[1]
DOCS = user_docs()                                                 # README.md and docs/*.md: page -> text
README = DOCS["README.md"]
#: each page's text outside code blocks
PROSE = {page: re.sub(r"```.*?```", "", text, flags=re.S) for page, text in DOCS.items()}
#: (page, inline code span on one line) for every span of every page
SPANS = [(page, " ".join(s.split())) for page, prose in PROSE.items() for s in re.findall(r"`([^`]+)`", prose)]
PACKAGE_DIRS = [ROOT / d for d in ("lrnnx_zoo", "plugins", "export")]


def subcommands() -> dict:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def package_source() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for d in PACKAGE_DIRS for p in sorted(d.rglob("*.py")))


# -- files and folders --------------------------------------------------------------------------
def test_every_repository_path_the_docs_name_exists():
    # A renamed test or benchmark left the README sending users to a file that is not there.
    paths = {(page, path) for page, text in DOCS.items() for path in re.findall(
        r"(?<![\w/.-])((?:tests|benchmarks|scripts|examples|lrnnx_zoo|checkpoints|plugins)/[\w./-]*\w/?)", text)}
    assert len({path for _, path in paths}) >= 25
    missing = sorted(f"{page}: {path}" for page, path in paths if not (ROOT / path).exists())
    # bare script and test file names (`bench_export.py`, ...) live in benchmarks/ and tests/
    for page, text in DOCS.items():
        for name in set(re.findall(r"(?<![\w/])((?:bench|test)_\w+\.py)\b", text)):
            folder = ROOT / ("benchmarks" if name.startswith("bench_") else "tests")
            if not (folder / name).is_file():
                missing.append(f"{page}: {name}")
    assert missing == [], f"the docs name files that do not exist: {missing}"


def test_every_test_function_the_docs_name_exists():
    names = {(page, s) for page, s in SPANS if re.fullmatch(r"test_\w+", s)}
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    assert names and [f"{page}: {n}" for page, n in sorted(names) if f"def {n}(" not in source] == []


# -- command lines ------------------------------------------------------------------------------
def test_the_command_line_paragraph_names_every_subcommand_and_no_other():
    paragraph = README.split("\nCommand line: ", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`lrnnx-zoo (\w+)", paragraph))
    assert named == set(subcommands())


def _accepts(parser: argparse.ArgumentParser, words: list) -> bool:
    try:
        parser.parse_args(words)
    except SystemExit:
        return False
    return True


def _minimal_args(name: str, sub: argparse.ArgumentParser) -> list:
    """The positionals and required options that make ``lrnnx-zoo NAME`` parse."""
    words = [name]
    for action in sub._actions:
        if not action.option_strings and action.nargs not in ("?", "*"):
            words.append("digits-lru" if action.dest != "repo" else "org/name")
        elif action.required:
            words += [action.option_strings[0], "out"]
    return words


def test_every_flag_the_docs_name_is_an_option_of_a_command_or_script_and_takes_the_value_shown():
    # Flags in prose (`--checkpoint-every epoch`, `--resume PATH`, `--batch 1`, `--opset 16`, `--branch`)
    # have no command around them for test_readme's parse: each must be an option of some
    # `lrnnx-zoo` subcommand that accepts the value shown, or of a benchmark script.
    parser, subs = build_parser(), subcommands()
    bench_flags = set()
    for script in (ROOT / "benchmarks").glob("*.py"):
        bench_flags |= set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)", script.read_text(encoding="utf-8")))
    pytest_flags = {"-n", "-x", "-q", "-k"}
    wrong = []
    checked = 0
    for page, span in SPANS:
        if not span.startswith("-"):
            continue
        words = span.split()
        flags = [w for w in words if w.startswith("-")]
        if flags[0] in pytest_flags or all(f in bench_flags for f in flags):
            continue
        checked += 1
        owners = [(n, s) for n, s in subs.items() if all(f in s._option_string_actions for f in flags)]
        if len(words) == 1:                      # the flag alone (`--push-to-hub`): it must exist
            ok = bool(owners)
        else:                                    # with a value: some owner takes it
            argv = [{"PATH": "somewhere", "N": "5"}.get(w, w) for w in words]
            ok = any(_accepts(parser, _minimal_args(n, s) + argv) for n, s in owners)
        if not ok:
            wrong.append(f"{page}: {span}")
    assert checked >= 15
    assert wrong == [], f"the docs show flags no subcommand or benchmark takes as shown: {wrong}"


def test_every_benchmark_command_the_docs_show_uses_that_scripts_options():
    commands = [(page, *c) for page, prose in PROSE.items() for c in re.findall(
        r"(?:python|\.venv/bin/python) (benchmarks/\w+\.py)((?: --?[\w-]+(?: [^\s`-][^\s`]*)*)*)", prose)]
    assert len(commands) >= 8
    wrong = []
    for page, script, args in commands:
        source = (ROOT / script).read_text(encoding="utf-8")
        declared = set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)", source)) | {"--help"}
        wrong += [f"{page}: {script} {flag}" for flag in re.findall(r"--[\w-]+", args) if flag not in declared]
    # "--batch 16 --s4-discretization zoh" is bench_prefill's, named in the sentence after its command
    prefill = (ROOT / "benchmarks/bench_prefill.py").read_text(encoding="utf-8")
    assert all(f'"{flag}"' in prefill for flag in ("--batch", "--s4-discretization", "--s4-paths"))
    assert wrong == [], f"the docs show benchmark options the scripts do not declare: {wrong}"


def test_every_example_in_the_subcommands_help_parses():
    # `lrnnx-zoo COMMAND --help` is the other manual: its examples and the commands its description
    # names must parse too.
    parser = build_parser()
    placeholders = {"SRC": "digits-lru", "DIR": "out", "REPO": "org/name", "F": "onnx"}
    found = []
    for name, sub in subcommands().items():
        text = sub.format_help()
        for command in re.findall(r"(?m)^\s*(lrnnx-zoo [^\n]*)$", text) + re.findall(r"`(lrnnx-zoo [^`]*)`", text):
            found.append(command)
            words = [placeholders.get(w, w) for w in shlex.split(command)[1:]]
            assert _accepts(parser, words), f"`lrnnx-zoo {name} --help` shows a command that does not parse: {command}"
    assert len(found) >= 20


# -- environment --------------------------------------------------------------------------------
def test_every_environment_variable_the_docs_name_is_read():
    # LRNNX_* must be read by this package; HF_* by it or by huggingface_hub (whose behaviour the docs
    # describe, e.g. HF_HUB_DISABLE_XET).
    import huggingface_hub.constants as hf
    names = {(page, n) for page, text in DOCS.items() for n in re.findall(r"\b((?:HF|LRNNX)_[A-Z0-9_]+)\b", text)}
    assert {"HF_HUB_ETAG_TIMEOUT", "LRNNX_ZOO_HUB_MIN_RATE", "LRNNX_ZOO_DISABLE_PLUGIN_AUTOLOAD"} <= {n for _, n in names}
    source, hf_source = package_source(), Path(hf.__file__).read_text(encoding="utf-8")
    unread = [f"{page}: {n}" for page, n in sorted(names)
              if f'"{n}"' not in source and not (n.startswith("HF_") and f'"{n}"' in hf_source)]
    assert unread == [], f"the docs name environment variables nothing reads: {unread}"


# -- the zoo ------------------------------------------------------------------------------------
def test_the_zoo_table_states_each_shipped_checkpoints_recorded_metrics():
    table = README.split("\n## The zoo", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([\w-]+)` \|.*\| ([^|]+) \|$", table, flags=re.M)
    shipped = {p.parent.name for p in (ROOT / "checkpoints").glob("*/config.json")}
    assert {name for name, _ in rows} == shipped
    for name, result in rows:
        metrics = json.loads((ROOT / "checkpoints" / name / "config.json").read_text())["metrics"]
        if "accuracy" in result:
            assert result.strip() == f"accuracy {100 * metrics['test_accuracy']:.1f}%", name
        else:
            assert result.strip() == (f"MSE {metrics['test_mse']:.3f} vs {metrics['naive_test_mse']:.3f} "
                                      f"for the last-value forecast"), name


def test_the_card_command_the_docs_quote_is_a_shipped_cards_with_its_thread_count():
    # The README and docs/checkpoints.md quoted `lrnnx-zoo train digits-s4d --out checkpoints/digits-s4d --seed 0`
    # as the command that "gives the same weights bit for bit"; the cards run it under OMP_NUM_THREADS=1, and
    # on a 2-core machine the quoted line trained other weights (forecast-sunspots-s4d's differed at byte 3129).
    for page in ("README.md", "docs/checkpoints.md"):
        quoted = re.findall(r"`(lrnnx-zoo train ([\w-]+) [^`]*)` under `(OMP_NUM_THREADS=\d+)`", PROSE[page])
        assert quoted, f"{page} quotes no card command with its thread count"
        for command, name, threads in quoted:
            assert f"{threads} {command}\n" in (ROOT / "checkpoints" / name / "README.md").read_text(), (page, command)


# -- defaults and limits the prose states -------------------------------------------------------
def _claims():
    """(what, README pattern with one group per number, the code's numbers)."""
    from lrnnx_zoo import evaluate_cli, folder_swap, hub, ssm_kernel, step_forms, training_state
    from lrnnx_zoo.export import graph_size, onnx_export, options, quantize, step_graph, validate
    from lrnnx_zoo.plugins.s4 import kernel as s4_kernel
    mib = 1 << 20
    return [
        ("default opset and range", r"opset (\d+) by default, any opset in (\d+)-(\d+); below (\d+) it is written",
         (options.DEFAULT_OPSET, options.MIN_OPSET, options.MAX_OPSET, options.MIN_DYNAMO_OPSET)),
        ("validation lengths", r"held-out sequence of (\d+) steps .*? or (\d+) steps \(`export_folder`",
         (validate.DEFAULT_LENGTH, options.FOLDER_VALIDATION_LENGTH)),
        ("float32 tolerance", r"above (1e-\d) it fails", (validate.FLOAT32_TOLERANCE,)),
        ("int8 tolerance and sequences", r"within (\d+)% of the float graph's largest output .*? of (\d+) more "
         r"standard-normal", (100 * quantize.INT8_RELATIVE_TOLERANCE, quantize.INT8_EXTRA_SEQUENCES)),
        ("graph= check", r"\((1e-\d) relative; ([\d.]+) for int8\)",
         (step_graph.GRAPH_CONTINUES_TOLERANCE, step_graph.INT8_GRAPH_CONTINUES_TOLERANCE)),
        ("onnxruntime per opset", r"opset (\d+) runs on onnxruntime ([\d.]+) and newer, opset (\d+) on ([\d.]+), "
         r"(\d+) and below on ([\d.]+)", (options.DEFAULT_OPSET, onnx_export.ONNXRUNTIME_FOR_OPSET[20], 19,
                                          onnx_export.ONNXRUNTIME_FOR_OPSET[19], 18,
                                          onnx_export.OLDEST_ONNXRUNTIME_TESTED)),
        ("ONNX file limit", r"one ONNX file's (\d+) GiB", (round(onnx_export.ONNX_FILE_LIMIT / 2**30),)),
        ("chunk build margin", r"checked with a margin: (\d+)x", (graph_size.BUILD_PEAK,)),
        ("snapshots kept", r"the newest (two) are kept", (training_state.KEEP,)),
        ("evaluate --check", r"differs by more than (1e-\d) \+ (1e-\d) x its value", (evaluate_cli.ATOL,
                                                                                   evaluate_cli.RTOL)),
        ("Hub timeout", r"a whole number: huggingface_hub refuses `2.5`; default (\d+)\), one whose answer's "
         r"headers are not complete (twice) that long", (hub.DEFAULT_HUB_TIMEOUT, hub.HEADER_DEADLINE_PERIODS)),
        ("Hub minimum rate", r"(\d+) KiB/s x", (hub.DEFAULT_HUB_MIN_RATE / 1024,)),
        ("Hub config size", r"a config or card over (\d+) MB", (hub.MAX_CONFIG_BYTES / mib,)),
        ("Hub card size", r"a config or card over (\d+) MB", (hub.MAX_CARD_BYTES / mib,)),
        ("folder swap", r"more than ([\d,]+) entries", (folder_swap.CARRY_LIMIT,)),
        ("slow poles", r"> (1e-\d) \(1 - \|lam\|\), `step_forms.SLOW_POLE_ERROR`", (step_forms.SLOW_POLE_ERROR,)),
        ("fused LRU step", r"blocks beyond ([\d,]+) matrix entries", (step_forms.FUSE_LIMIT,)),
        ("S4 dense cache", r"`lrnnx_zoo.plugins.s4.kernel.DENSE_CACHE_BYTES` \((\d+) MiB\)",
         (s4_kernel.DENSE_CACHE_BYTES / mib,)),
        ("kernel cache", r"older ones while they hold at most (\d+) MiB and number at most (\d+),\s*"
         r"`lrnnx_zoo.ssm_kernel.KERNEL_CACHE_BYTES`", (ssm_kernel.KERNEL_CACHE_BYTES / mib,
                                                          ssm_kernel.KERNEL_CACHE_ENTRIES)),
    ]


WORDS = {"two": "2", "twice": "2"}


@pytest.mark.parametrize("what, pattern, expected", [pytest.param(*c, id=c[0]) for c in _claims()])
def test_a_default_the_docs_state_is_the_codes(what, pattern, expected):
    # Numbers are compared as numbers after parsing the docs' spelling ("1e-4", "2,000", "two"),
    # version strings as strings: a stated default is either the constant or wrong, on whichever page
    # (README.md or docs/*.md) states it, and wherever it is stated again.
    found = [(page, m) for page, text in DOCS.items() for m in re.finditer(pattern, " ".join(text.split()))]
    assert found, f"no page states the {what} as {pattern!r} any more: update the docs or this claim"
    for page, match in found:
        for stated, code in zip(match.groups(), expected, strict=True):
            stated = WORDS.get(stated, stated).replace(",", "")
            same = stated == code if isinstance(code, str) else float(stated) == float(code)
            assert same, f"{page} states the {what} as {stated}, the code has {code}"


def test_every_statement_of_how_many_kernels_a_layer_keeps_gives_the_caches_bounds():
    # "each layer keeps at most its two latest kernels" (Long-running processes) outlived the cache's
    # growth to the two newest plus older ones within KERNEL_CACHE_BYTES and KERNEL_CACHE_ENTRIES:
    # a layer evaluated at ten lengths holds eight spectra.
    from lrnnx_zoo import ssm_kernel
    statements = [(page, " ".join(text.split())) for page, text in DOCS.items()]
    statements = [(page, text[m.start():m.start() + 300]) for page, text in statements
                  for m in re.finditer(r"two (?:latest|newest) (?:kernels|\(L, rate\))", text)]
    assert statements
    for page, sentence in statements:
        assert f"{ssm_kernel.KERNEL_CACHE_BYTES >> 20} MiB" in sentence, (page, sentence)
        assert f"at most {ssm_kernel.KERNEL_CACHE_ENTRIES}" in sentence, (page, sentence)


def test_the_exit_statuses_the_docs_state_are_the_signals_conventions():
    # "exit 130, 143 or 129" for Ctrl-C, SIGTERM and SIGHUP, in that order, wherever it is stated
    stated = [s for text in DOCS.values() for s in re.findall(r"exit (\d+), (\d+),? (?:or|and) (\d+)", " ".join(text.split()))]
    assert len(stated) >= 2
    expected = tuple(str(128 + s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
    assert all(s == expected for s in stated)


# -- methods, attributes and keywords outside the lrnnx_zoo. namespace ---------------------------
def _objects():
    from lrnnx_zoo import export, scan, ssm_kernel, step_forms, training
    from lrnnx_zoo.plugins import fftconv, lru, s4
    return {"SequenceModel": lrnnx_zoo.SequenceModel, "LTI_LRNN": lrnnx_zoo.LTI_LRNN,
            "OnnxStreamer": export.OnnxStreamer, "SSMKernel": ssm_kernel.SSMKernel, "LRU": lru.LRU,
            "S4": s4.S4, "SSKernelNPLR": s4.SSKernelNPLR, "FFTConvS4": fftconv.FFTConvS4,
            "step_forms": step_forms, "model": lrnnx_zoo.SequenceModel, "layer": lrnnx_zoo.LTI_LRNN,
            "stream": export.OnnxStreamer, "streamer": export.OnnxStreamer, "result": export.ExportResult,
            "param_groups": training.param_groups, "to_onnx": export.to_onnx,
            "export_folder": export.export_folder, "diagonal_scan": scan.diagonal_scan,
            "create_layer": lrnnx_zoo.create_layer}


def test_every_method_and_attribute_the_docs_name_on_a_library_class_exists():
    # `SequenceModel.fork_cache`, `OnnxStreamer.copy(index=None)`, `step_forms.SLOW_POLE_ERROR`,
    # `LTI_LRNN.resample_`: test_readme resolves only names spelt from `lrnnx_zoo.`.
    # `kernel.*` is an S4 layer's kernel (`kernel.extend_length_in_place`, `kernel.refine_ill_conditioned`)
    objects = {**_objects(), "kernel": lrnnx_zoo.create_layer("s4", 4, d_state=4).kernel}
    missing, checked = [], 0
    for page, span in SPANS:
        for head, rest in re.findall(r"(?<![\w.])([A-Za-z_]\w*)((?:\.\w+)+)", span):
            if head not in objects or rest in (".safetensors", ".py"):
                continue
            obj = objects[head]
            checked += 1
            for attr in rest[1:].split("."):
                fields = getattr(obj, "__dataclass_fields__", {})
                if not hasattr(obj, attr) and attr not in fields:
                    missing.append(f"{page}: {head + rest}")
                    break
                obj = getattr(obj, attr, None)
    assert checked >= 20 and missing == [], f"the docs name members that do not exist: {missing}"


def test_every_keyword_the_docs_pass_to_a_library_callable_is_one_it_takes():
    # `train(..., checkpoint_every=500)`, `export_folder(..., rate=2)`, `to_onnx(model, path, chunk=32)`,
    # `OnnxStreamer.copy(index=None)`; a default shown as `kw=None` must be the signature's default.
    objects = _objects()
    objects.update({"lrnnx_zoo": lrnnx_zoo})
    wrong, checked = [], 0
    for page, span in SPANS:
        for name, args in re.findall(r"([A-Za-z_][\w.]*)\(([^()]*)\)", span):
            head, *rest = name.split(".")
            obj = objects.get(head)
            try:
                for attr in rest:
                    obj = getattr(obj, attr)
                params = inspect.signature(obj).parameters if callable(obj) else None
            except (AttributeError, TypeError, ValueError):
                params = None
            if not params:
                continue
            open_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
            for kw, value in re.findall(r"(?<![\w.])(\w+)=([^,)]*)", args):
                checked += 1
                if kw not in params and not open_kw:
                    wrong.append(f"{page}: {name}({kw}=)")
                elif value.strip() == "None" and kw in params and params[kw].default is not None:
                    wrong.append(f"{page}: {name}({kw}=None): default {params[kw].default!r}")
    assert checked >= 10 and wrong == [], f"the docs pass keywords the callables do not take: {wrong}"


# -- links between README.md and docs/ -----------------------------------------------------------
def heading_anchors(text: str) -> set:
    """The #anchors a renderer gives the page's headings (GitHub's rule: lower case, punctuation but
    hyphens dropped, spaces to hyphens; a repeated heading gets -1, -2, ...)."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_every_relative_link_leads_to_a_file_and_heading_that_exist():
    # README.md was split into docs/ pages that link to each other by section: a renamed heading or
    # moved page would leave a link to nothing.
    broken, checked = [], 0
    for page, prose in PROSE.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z][\w+.-]*:", target):                     # https:, mailto: ...
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            file = (ROOT / page).parent / path if path else ROOT / page
            if not file.resolve().exists():
                broken.append(f"{page}: {target} (no such file)")
            elif anchor and anchor not in heading_anchors(file.read_text(encoding="utf-8")):
                broken.append(f"{page}: {target} (no heading #{anchor} in {path or page})")
    assert checked >= 40
    assert broken == [], f"links that lead nowhere: {broken}"


def test_every_docs_page_is_linked_from_the_readme_and_opens_with_a_title_and_summary():
    linked = {(ROOT / p).resolve() for p in re.findall(r"\]\((docs/[\w.-]+\.md)(?:#[^)]*)?\)", README)}
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages and [p.name for p in pages if p.resolve() not in linked] == []
    for page in pages:
        title, blank, summary = page.read_text(encoding="utf-8").split("\n", 3)[:3]
        assert title.startswith("# ") and blank == "" and summary and not summary.startswith(("#", "-")), page.name


def test_every_pointer_from_the_code_to_a_docs_section_finds_it():
    # Error messages, docstrings and benchmark output point users at a section ("(README, 'Long
    # streams')"); when README.md was split into docs/, such a pointer must name the page the section
    # now lives on and a heading that page has.
    headings = {page: [h.strip().lower() for h in re.findall(r"^#{1,6} +(.+)$", re.sub(r"```.*?```", "", text, flags=re.S),
                                                           flags=re.M)] for page, text in DOCS.items()}
    sources = [p for d in (*PACKAGE_DIRS, ROOT / "benchmarks", ROOT / "scripts") for p in sorted(d.rglob("*"))
               if p.suffix in (".py", ".sh")]
    wrong, checked = [], 0
    for source in sources:
        text = source.read_text(encoding="utf-8")
        where = source.relative_to(ROOT)
        for page in re.findall(r"\b(docs/[\w-]+\.md)", text):
            checked += 1
            if page not in DOCS:
                wrong.append(f"{where}: {page} (no such page)")
        pointers = re.findall(r"\b(docs/[\w-]+\.md),? \(?[\"']([^\"']+)[\"']", text)
        pointers += [("README.md", s) for s in re.findall(r"\bREADME(?:'s)?,? [\"']([^\"']+)[\"']", text)]
        for page, section in pointers:
            checked += 1
            if page in DOCS and not any(h.startswith(section.lower()) for h in headings[page]):
                wrong.append(f"{where}: {page}, {section!r} (no such heading)")
    assert checked >= 10
    assert wrong == [], f"pointers to sections that do not exist: {wrong}"
