"""What the library reads, writes and uploads from folders made by others (downloaded, shared).

Policy: links in a checkpoint or export folder are followed when *reading* (the Hub cache links a
snapshot's files to ../../blobs, and a user may link big weights from a shared drive); what the
library *writes* replaces an entry (a link included) with a new file and never writes through a
link it did not get as the destination itself; files whose size an outsider sets are not read
whole past a bound; an upload names exactly its files.
"""

from __future__ import annotations

import builtins
import io
import os
import shlex
import threading
from pathlib import Path

import pytest
import torch

from lrnnx_zoo import ModelConfig, SequenceModel
from lrnnx_zoo import training_state as TS
from lrnnx_zoo.cli import main as cli_main
from lrnnx_zoo.recipes import get_recipe
from lrnnx_zoo.training import train
from lrnnx_zoo.training_state import SnapshotError

pytestmark = pytest.mark.filterwarnings("ignore:Use .content=:DeprecationWarning")

#: larger than every bound here (16 MiB for configs, cards and state.json); sparse, so no disk is used
SPARSE = 1 << 30


def tiny() -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel(ModelConfig(layer="s4d", d_input=3, d_output=2, d_model=8, n_layers=1,
                                     layer_kwargs={"d_state": 4})).eval()


def sparse(path: Path, size: int = SPARSE) -> Path:
    """Make ``path`` a regular file of ``size`` bytes that holds no data on disk."""
    if os.path.lexists(path):
        path.unlink()
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def never_opened(monkeypatch):
    """forbid(path): opening ``path`` with open() (Path.read_text/read_bytes too) fails the test, so a
    file read whole is caught before gigabytes are allocated on a shared machine."""
    forbidden = set()
    real = io.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) in forbidden:
            raise AssertionError(f"{file} was opened, expected it to be refused by its size unread")
        return real(file, *args, **kwargs)
    monkeypatch.setattr(io, "open", guarded)
    monkeypatch.setattr(builtins, "open", guarded)
    return lambda path: forbidden.add(os.path.realpath(path))


def test_a_snapshot_name_linked_out_of_the_run_is_replaced_not_the_folder_it_points_to(tmp_path):
    # A shared run folder with training_state/step-00000020 -> ~/Documents: resuming it from step 10
    # and writing step 20 replaced ~/Documents by the snapshot (its files were gone).
    root = tmp_path / "run" / TS.SNAPSHOT_DIR
    root.mkdir(parents=True)
    victim = tmp_path / "documents"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    (root / "step-00000020").symlink_to(victim)
    (root / "step-00000001").symlink_to(victim)        # an old one, pruned: the link goes, not its target
    tensors, record = {"rng.augment": torch.zeros(4, dtype=torch.uint8)}, {"run": {}}
    for step in (10, 20, 30):
        TS.write_snapshot(root, step, tensors, record)
    assert sorted(p.name for p in victim.iterdir()) == ["thesis.tex"]
    assert sorted(os.listdir(root)) == ["step-00000020", "step-00000030"]     # no hidden leftover link
    assert not (root / "step-00000020").is_symlink()
    assert TS.read_snapshot(root / "step-00000020")[1]["step"] == 20


@pytest.mark.parametrize("name", [TS.STATE_NAME, TS.TENSORS_NAME])
def test_a_snapshot_file_larger_than_the_run_can_write_is_refused_unread(tmp_path, name, never_opened):
    # Both files were read whole before any check: a (sparse) 1 GB one took 1 GB of memory, or more.
    recipe = get_recipe("digits-tiny")
    out = tmp_path / "run"
    root = TS.snapshot_root(out)
    folder = TS.write_snapshot(root, 5, {"rng.augment": torch.zeros(4, dtype=torch.uint8)},
                               {"run": TS.run_record(recipe, 1, 1)})
    never_opened(sparse(folder / name))
    with pytest.raises(SnapshotError, match=rf"{name} is 1073\.7 MB, expected at most [\d.]+ MB \(.*\); it is not read"):
        train(recipe, out_dir=str(out), resume=str(folder), progress=False)
    assert TS.snapshot_bound(recipe) < SPARSE


def test_the_snapshot_bound_holds_every_shipped_recipes_snapshot():
    # weights + AdamW's two moments in float64 are 24 bytes per parameter: the bound must not refuse them
    from lrnnx_zoo.recipes import list_recipes
    for name in list_recipes():
        recipe = get_recipe(name)
        model = SequenceModel(ModelConfig(**recipe.model))
        state = sum(t.numel() * 8 for t in model.state_dict().values())
        moments = sum(2 * p.numel() * 8 for p in model.parameters())
        assert state + moments < TS.snapshot_bound(recipe) - (64 << 20), name


def test_an_oversized_card_or_config_is_not_read_by_info_push_or_save(tmp_path, never_opened, capsys):
    # `lrnnx-zoo info` read a 1 GB README.md whole; a refused `lrnnx-zoo push` read the config.json that
    # from_pretrained had refused for its size (to word a hint); a save over the folder read it too.
    model = tiny()
    folder = model.save_pretrained(tmp_path / "ck")
    never_opened(sparse(folder / "README.md"))
    assert cli_main(["info", str(folder)]) == 0
    assert "README.md (the model card) is 1074 MB, expected at most 17 MB" in capsys.readouterr().out
    never_opened(sparse(folder / "config.json"))
    assert cli_main(["push", str(folder), "acme/x"]) == 2
    assert "config.json is 1074 MB, expected a config of at most 17 MB" in capsys.readouterr().err
    model.save_pretrained(folder)              # no config from_pretrained reads: replaced, as a damaged one
    assert (folder / "config.json").stat().st_size < 1 << 20


def test_a_refused_push_never_opens_a_fifo_named_config_json(tmp_path, capsys):
    # from_pretrained refused the FIFO, then the hint for an export folder opened it and waited forever.
    folder = tiny().save_pretrained(tmp_path / "ck")
    fifo = folder / "config.json"
    fifo.unlink()
    os.mkfifo(fifo)
    waited, done = [], threading.Event()

    def release_a_waiting_reader():     # a reader blocked in open() is let go (EOF), and recorded
        while not done.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)     # succeeds only while a reader waits
            except OSError:
                done.wait(0.01)
                continue
            waited.append(True)
            os.close(fd)
    helper = threading.Thread(target=release_a_waiting_reader, daemon=True)
    helper.start()
    try:
        assert cli_main(["push", str(folder), "acme/x"]) == 2
    finally:
        done.set()
        helper.join()
    assert "is not a regular file (a FIFO)" in capsys.readouterr().err
    assert waited == []


def test_the_retry_an_export_push_failure_gives_uploads_only_the_export(tmp_path, local_hub, monkeypatch):
    # Its hint `hf upload REPO DIR` uploaded the whole folder: the user's .env and own files beside the
    # export, and the file a link there points to.
    import huggingface_hub
    from huggingface_hub.cli.hf import app
    from huggingface_hub.errors import HTTPError
    from click.testing import CliRunner

    from lrnnx_zoo.export import export_folder
    from lrnnx_zoo.hub_save import HubPublishError

    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET")
    out = tmp_path / "export"
    out.mkdir()
    (out / ".env").write_text("SECRET")
    (out / "notes.txt").symlink_to(secret)

    def unreachable(*args, **kwargs):
        raise HTTPError("connection reset")
    with monkeypatch.context() as m:
        m.setattr(huggingface_hub.HfApi, "upload_folder", unreachable)
        with pytest.raises(HubPublishError, match="hf upload") as info:
            export_folder(tiny(), out, format="torchscript", latency_steps=0, validation_length=8,
                          push_to_hub="acme/e")
    hint = str(info.value).rsplit("`hf upload ", 1)[1].split("`")[0]
    if type(app).__name__ == "Typer":        # huggingface_hub 1.x's hf is a Typer app: click runs its command
        import typer
        app = typer.main.get_command(app)
    result = CliRunner().invoke(app, ["upload", *shlex.split(hint)])
    assert result.exit_code == 0, result.output
    assert sorted(local_hub.list_files("acme/e")) == [".gitattributes", "README.md", "config.json", "model.ts",
                                                      "step_form.safetensors"]


def test_pushes_from_a_folder_with_stray_and_linked_files_upload_only_new_checkpoint_files(tmp_path, local_hub):
    # Guard: the card and config uploaded are written afresh (a README.md linked to a secret is replaced,
    # the secret untouched), hidden files, .git, training_state and links beside them stay home.
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET")
    model = tiny()
    folder = model.save_pretrained(tmp_path / "ck")
    (folder / ".env").write_text("SECRET")
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("SECRET")
    (folder / "training_state").mkdir()
    (folder / "training_state" / "x").write_text("SECRET")
    (folder / "link.txt").symlink_to(secret)
    (folder / "README.md").unlink()
    (folder / "README.md").symlink_to(secret)
    assert cli_main(["push", str(folder), "acme/b"]) == 0
    model.save_pretrained(folder, push_to_hub=True, repo_id="acme/a")
    for repo in ("acme/a", "acme/b"):
        files = local_hub.list_files(repo)
        assert sorted(files) == [".gitattributes", "README.md", "config.json", "model.safetensors"]
        assert not any(b"SECRET" in local_hub.read_file(repo, f) for f in files)
    assert secret.read_text() == "SECRET" and not (folder / "README.md").is_symlink()


def test_a_push_into_a_repo_with_an_oversized_config_refuses_it_without_downloading_it(tmp_path, local_hub,
                                                                                        monkeypatch):
    # The pre-push check downloaded the repo's config.json whole to see whose it was: a repo whose
    # config.json is 3 GB was fetched in full before the refusal. The listing's size now decides.
    from huggingface_hub import HfApi
    from lrnnx_zoo import hub_save
    from lrnnx_zoo.export import export_folder
    from lrnnx_zoo.hub_save import HubPublishError

    monkeypatch.setattr(hub_save, "MAX_CONFIG_BYTES", 1000)       # stands for 16 MB: a 2 kB file is "huge"
    HfApi().create_repo("acme/huge")
    HfApi().upload_file(path_or_fileobj=b'{"library": "lrnnx-zoo", "pad": "' + b"x" * 2000 + b'"}',
                        path_in_repo="config.json", repo_id="acme/huge")
    before = len(local_hub.requests)
    model = tiny()
    with pytest.raises(HubPublishError, match=r"refusing to upload a checkpoint to 'acme/huge': it holds a "
                                              r"config.json of 0 MB \(an lrnnx-zoo one is a few kB; it was not "
                                              r"downloaded\).*model in memory is unchanged"):
        model.push_to_hub("acme/huge")
    with pytest.raises(HubPublishError, match=r"refusing to upload to 'acme/huge': its config.json does not come "
                                              r"from `lrnnx-zoo export`"):
        export_folder(model, tmp_path / "exp", format="torchscript", latency_steps=0, validation_length=8,
                      push_to_hub="acme/huge")
    fetched = [r.path for r in local_hub.requests[before:] if r.path.endswith("/config.json")]
    assert fetched == []                                          # neither check downloaded it
    assert sorted(local_hub.list_files("acme/huge")) == [".gitattributes", "config.json"]   # nothing uploaded
