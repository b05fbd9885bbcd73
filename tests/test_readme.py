"""README.md's usage, zoo and export snippets and every python block of the docs/*.md pages run as written;
the `lrnnx-zoo` command lines of README.md and of every docs/*.md page parse, and the `lrnnx_zoo.*` names
their prose gives exist.

(The plugin guide's module is checked verbatim in test_example_plugin, the training snippet in
test_training_journey, the demo in test_checkpoints; test_readme_references checks the rest of what the
pages state, and their links.)
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

import lrnnx_zoo
from lrnnx_zoo.cli import build_parser
from lrnnx_zoo.registry import DISABLE_AUTOLOAD_ENV

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def user_docs() -> dict:
    """The user documentation, README.md and every docs/*.md page: path relative to the root -> text.

    Detail moved from README.md into docs/ stays under every check that reads this."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in pages}


DOCS = user_docs()


def code_blocks(section: str, lang: str, page: str = "README.md") -> list:
    """The ```lang blocks of the section headed ``## {section}`` of ``page`` (README.md or docs/*.md)."""
    text = DOCS[page].split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


@pytest.fixture
def builtins_only(monkeypatch):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    lrnnx_zoo.reload_plugins()
    yield
    monkeypatch.undo()
    lrnnx_zoo.reload_plugins()


def test_usage_snippet_runs(builtins_only):
    (code,) = code_blocks("Usage", "python")
    names = {}
    exec(code, names)
    claimed = re.search(r"list_layers\(\)\s*# (\[.*\])", code).group(1)
    assert lrnnx_zoo.list_layers() == ast.literal_eval(claimed)
    assert names["y"].shape == (8, 1024, 128) and names["y_t"].shape == (8, 128)
    assert names["logits"].shape == (4, 10)


def test_export_snippet_runs(tmp_path, monkeypatch):
    (code,) = code_blocks("Export", "python")
    monkeypatch.chdir(tmp_path)
    names = {}                          # as written: x_t and x were left to the reader (a NameError)
    exec(code, names)
    assert names["result"].validation.passed and (tmp_path / "digits-lru.onnx").is_file()
    assert names["y_t"].shape == (1, 10) and names["y_t"].dtype == np.float32
    assert names["y"].shape == (1, 20, 10) and names["y"].dtype == np.float32


def test_zoo_snippet_runs_against_a_local_hub(local_hub, tmp_path, monkeypatch):
    # Its five lines had no test: a renamed argument (revision=, task=, dataset=, metrics=) or
    # method would have left a README that fails at the first line a user copies.
    (code,) = [b for b in code_blocks("The zoo: checkpoints, loading, training", "python") if "push_to_hub" in b]
    monkeypatch.chdir(tmp_path)
    shipped = lrnnx_zoo.from_pretrained("digits-lru")
    shipped.save_pretrained("path/to/folder")                      # the snippet's local folder
    shipped.push_to_hub("org/name")
    local_hub.tag("org/name", "v1.0")                              # and its Hub revision
    # The card fields are placeholders (...): give each a value of the kind save_pretrained takes.
    fields = "task=..., dataset=..., metrics=..."
    assert fields in code
    code = code.replace(fields,
                        'task="sequence-classification", dataset={"name": "digits"}, '
                        'metrics={"test_accuracy": 0.9}')
    exec(compile(code, "README.md", "exec"), {"lrnnx_zoo": lrnnx_zoo})
    assert lrnnx_zoo.from_pretrained("my-model").config == shipped.config
    assert "model.safetensors" in local_hub.list_files("org/my-model")


#: Every python block of the docs/ pages, (page, section) -> the test below that runs it as written. The
#: README's are run above and in test_training_journey, test_transfer_learning and test_example_plugin.
DOCS_SNIPPETS = {("docs/plugins.md", "Checking your layer"): "test_plugin_guides_contract_test_runs"}


def test_every_python_block_of_the_docs_pages_is_run():
    # docs/*.md had one python block, the plugin guide's contract test, and no test ran it: a renamed
    # parametrize_with_checks argument or LayerCheck call would have broken it unseen.
    found = {(page, section) for page, text in DOCS.items() if page.startswith("docs/")
             for section in re.findall(r"(?m)^## (.+)$", text) if code_blocks(section, "python", page)}
    assert found == set(DOCS_SNIPPETS), "a docs/ python block without a test that runs it (or a stale entry)"
    assert all(callable(globals().get(test)) for test in DOCS_SNIPPETS.values())


def test_plugin_guides_contract_test_runs():
    from plugin_fixtures import example_ema_plugin
    from lrnnx_zoo.testing import CHECKS, parametrize_with_checks
    (code,) = code_blocks("Checking your layer", "python", "docs/plugins.md")
    with example_ema_plugin("lrnnx_ema_docs"):
        names: dict = {}
        exec(compile(code, "docs/plugins.md", "exec"), names)
        (mark,) = names["test_lrnnx_zoo_contract"].pytestmark
        cases = mark.args[1]
        assert mark.args[0] == "check" and [p.id for p in cases] == [f"ema-{name}" for name in CHECKS]
        # its comment's other arguments are parametrize_with_checks's, their values its defaults
        others = re.search(r"# also (.*) and your layer's kwargs", code).group(1)
        spelled = eval(f"parametrize_with_checks('ema', {others}, init='flat')")
        assert [p.id for p in spelled.args[1]] == [p.id for p in cases]
        for case in cases:          # the two slowest (5 s) run in test_example_plugin, on the same module
            if case.values[0].name not in ("sequence_model", "onnx"):
                names["test_lrnnx_zoo_contract"](*case.values)


# Values for the README's placeholders, so that every command line it shows can be parsed.
PLACEHOLDERS = {"KIND": "cauchy", "PATTERN": "s4d", "NAME": "digits-lru", "RECIPE": "digits-tiny", "DIR": "out",
                "N": "0", "SRC": "digits-lru", "F": "onnx", "REPO": "org/name",
                "...": ""}


def command_lines(text: str) -> list:
    """The `lrnnx-zoo ...` command lines of a page: inline spans and lines of ```bash blocks."""
    commands = re.findall(r"`(lrnnx-zoo [^`]*)`", text)
    commands += [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
                 for line in block.splitlines() if line.startswith("lrnnx-zoo ")]
    return commands


def test_command_lines_parse():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    found = 0
    for page, text in DOCS.items():
        for command in command_lines(text):
            found += 1
            if re.fullmatch(r"lrnnx-zoo [\w-]+", command) and command.split()[1] in sub.choices:
                continue              # a command named (`lrnnx-zoo train` runs recipes), not a command line
            words = [PLACEHOLDERS.get(w, w) for w in shlex.split(command.replace("[", "").replace("]", ""))[1:]]
            try:
                parser.parse_args([w for w in words if w])
            except SystemExit:
                pytest.fail(f"{page}'s command does not parse: {command}")
    assert found >= 10


# `lrnnx_zoo.<key>` spans that name an exported graph's metadata keys (and its `lrnnx_zoo.json`
# extra file), not Python objects.
METADATA_NAMES = {"state_size", "state_layout", "d_input", "d_output", "family", "version", "source",
                  "task", "dataset", "chunk", "json"}


def test_every_api_name_the_docs_spell_out_exist():
    # The snippets above run, but the prose names ~60 more objects by their dotted path
    # (lrnnx_zoo.export.torchscript_export.read_metadata, lrnnx_zoo.step_forms.split_poles, ...);
    # a rename or move would leave a README or docs/ page that sends users to an AttributeError.
    names = {(name, page) for page, text in DOCS.items() for span in re.findall(r"`([^`]*)`", text)
             for name in re.findall(r"(?<![\w.:])lrnnx_zoo(?:\.\w+)+", span)}
    assert len({name for name, _ in names}) >= 40
    missing = []
    for name, page in sorted(names):
        parts = name.split(".")
        if len(parts) == 2 and parts[1] in METADATA_NAMES:
            continue
        for i in range(len(parts), 0, -1):           # the longest importable module prefix
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            missing.append(f"{page}: {name}")
    assert missing == [], f"the docs name objects that do not exist: {missing}"


def test_every_package_in_the_source_tree_is_declared():
    # lrnnx_zoo/datasets has an __init__.py but was missing from [tool.setuptools] packages, so the
    # README's first command (scripts/demo.sh installing the package) printed ~50 lines of
    # setuptools' "Package 'lrnnx_zoo.datasets' is absent from the `packages` configuration".
    tomllib = pytest.importorskip("tomllib")             # Python >= 3.11
    root = Path(__file__).resolve().parents[1]
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for package, folder in setup["package-dir"].items():
        for init in (root / folder).rglob("__init__.py"):
            sub = init.parent.relative_to(root / folder).parts
            if "__pycache__" not in sub:
                found.add(".".join((package, *sub)))
    assert found - set(setup["packages"]) == set()


def test_demo_help_names_a_command_that_runs_it_and_every_line_the_readme_says_it_prints(capsys):
    # `bash scripts/demo.sh --help` printed 'usage: demo.py ...' (no command runs a demo.py) and its
    # list of what is printed left out the prefill line that the README's main-job paragraph names.
    from lrnnx_zoo import demo
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m lrnnx_zoo.demo "), out.splitlines()[0]
    main_job = README.split("The main job:", 1)[1].split("\n\n", 1)[0]
    assert "model.prefill" in main_job and "model.prefill" in out
