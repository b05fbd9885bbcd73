"""`lrnnx-zoo push` given an export folder: it publishes checkpoints only, and the refusal named
OnnxStreamer and from_pretrained as the ways on but not the command that publishes an export
(`lrnnx-zoo export SRC --out DIR --push-to-hub REPO`), which a plugin author looking to publish the
ONNX graph of their layer then had to find in the README."""

from __future__ import annotations

import json

import pytest

from lrnnx_zoo.hub import EXPORT_KIND


def _export_folder(path, source):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"kind": EXPORT_KIND, "format": "torchscript",
                                                  "library": "lrnnx-zoo", "source_checkpoint": source}))
    return path


def test_push_of_an_export_folder_names_the_command_that_publishes_it(tmp_path, capsys):
    from lrnnx_zoo.cli import main
    folder = _export_folder(tmp_path / "exp", {"type": "local", "path": "/data/ck_tiny"})
    assert main(["push", str(folder), "me/graph"]) == 2
    err = capsys.readouterr().err
    assert "is an export folder" in err
    assert f"lrnnx-zoo export /data/ck_tiny --out {folder} --format torchscript --push-to-hub me/graph" in err, err


@pytest.mark.parametrize("config", ['{"kind": "checkpoint"}', "not json"])
def test_no_hint_for_other_folders(tmp_path, capsys, config):
    from lrnnx_zoo.cli import main
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    assert main(["push", str(folder), "me/graph"]) == 2
    assert "--push-to-hub" not in capsys.readouterr().err
