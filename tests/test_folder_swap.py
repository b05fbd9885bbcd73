"""Folders of files that belong together (checkpoints, exports) are replaced whole or not at all.

``lrnnx_zoo.folder_swap.replaced_folder`` writes a hidden sibling and exchanges it with the target;
these tests check both the exchange (Linux renameat2) and the two-rename fallback, and what
``export_folder`` keeps and drops when it writes over an earlier export.
"""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo import folder_swap
from lrnnx_zoo.export import export_folder
from lrnnx_zoo.folder_swap import exchange_paths, replaced_folder


def small_model(seed: int = 0) -> lrnnx_zoo.SequenceModel:
    torch.manual_seed(seed)
    cfg = lrnnx_zoo.ModelConfig(layer="s4d", d_input=3, d_output=2, d_model=8, n_layers=1,
                                layer_kwargs={"d_state": 4})
    return lrnnx_zoo.SequenceModel(cfg).eval()


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(params=["exchange", "two renames"])
def swap_mode(request, monkeypatch):
    if request.param == "two renames":
        monkeypatch.setattr(folder_swap, "_RENAMEAT2", None)
    return request.param


def test_exchange_paths_swaps_or_changes_nothing(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "f").write_text("A")
    (b / "f").write_text("B")
    swapped = exchange_paths(a, b)
    assert ((a / "f").read_text(), (b / "f").read_text()) == (("B", "A") if swapped else ("A", "B"))
    with pytest.raises(OSError):
        if not exchange_paths(a, tmp_path / "missing"):     # no exchange here: nothing to test
            raise OSError("no renameat2")


def test_replaced_folder_swaps_in_and_keeps_what_keep_accepts(tmp_path, swap_mode):
    target = tmp_path / "t"
    target.mkdir(mode=0o700)
    for name in ("ours.txt", "stale.bin", "mine.txt"):
        (target / name).write_text("old " + name)
    with replaced_folder(target, keep=lambda name: name != "stale.bin") as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".t.tmp-")
        (staging / "ours.txt").write_text("new")
        assert (target / "ours.txt").read_text() == "old ours.txt"   # nothing visible until the swap
    assert listing(target) == ["mine.txt", "ours.txt"]
    assert (target / "ours.txt").read_text() == "new" and (target / "mine.txt").read_text() == "old mine.txt"
    assert (target.stat().st_mode & 0o777) == 0o700
    assert listing(tmp_path) == ["t"]                               # no temporary or old folders left


def test_replaced_folder_failure_changes_nothing(tmp_path, swap_mode):
    target = tmp_path / "t"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with replaced_folder(target, keep=lambda name: True) as staging:
            (staging / "a").write_text("half")
            raise RuntimeError("boom")
    assert listing(target) == ["a"] and (target / "a").read_text() == "old"
    assert listing(tmp_path) == ["t"]

    fresh = tmp_path / "x" / "y" / "z"                             # missing parents are removed again
    with pytest.raises(KeyboardInterrupt):
        with replaced_folder(fresh, keep=lambda name: True):
            raise KeyboardInterrupt
    assert listing(tmp_path) == ["t"]


def test_reexport_in_another_format_drops_the_earlier_graph(tmp_path):
    out = tmp_path / "out"
    export_folder(small_model(), out, format="torchscript", latency_steps=0)
    (out / "notes.txt").write_text("mine")
    done = export_folder(small_model(), out, format="onnx", latency_steps=0)
    # model.ts no longer matched config.json (which now describes model.onnx): it is gone
    assert listing(out) == ["README.md", "config.json", "model.onnx", "notes.txt", "step_form.safetensors"]
    assert json.loads((out / "config.json").read_text())["file"] == "model.onnx" == done.files[0]
    assert (out / "notes.txt").read_text() == "mine"
    assert listing(tmp_path) == ["out"]


def test_failed_reexport_leaves_the_earlier_export_whole(tmp_path, monkeypatch):
    from lrnnx_zoo.export import folder as export_folder_module

    out = tmp_path / "out"
    export_folder(small_model(), out, format="onnx", latency_steps=0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    # the graph is already written (validated) when the weights fail: the old folder must stay whole
    monkeypatch.setattr(export_folder_module, "write_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        export_folder(small_model(seed=1), out, format="onnx", latency_steps=0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert listing(tmp_path) == ["out"]


def test_pushing_another_format_removes_the_earlier_graph_from_the_repo(tmp_path, local_hub):
    export_folder(small_model(), tmp_path / "ts", format="torchscript", latency_steps=0, push_to_hub="me/graph")
    (tmp_path / "user.txt").write_text("x")
    from huggingface_hub import HfApi
    HfApi().upload_file(path_or_fileobj=str(tmp_path / "user.txt"), path_in_repo="user.txt", repo_id="me/graph")
    export_folder(small_model(), tmp_path / "onnx", format="onnx", latency_steps=0, push_to_hub="me/graph")
    files = set(local_hub.list_files("me/graph"))
    assert "model.ts" not in files and {"model.onnx", "config.json", "user.txt"} <= files


def test_export_folder_expands_the_home_folder_and_never_overwrites_a_checkpoint_there(tmp_path, monkeypatch):
    # export_folder(src, "~/ck") checked ./~/ck (missing, so nothing to protect) but wrote $HOME/ck:
    # a checkpoint there lost its config.json and card and no longer loaded
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    small_model().save_pretrained("~/ck")
    with pytest.raises(FileExistsError, match="lrnnx-zoo checkpoint"):
        export_folder(small_model(), "~/ck", format="torchscript", latency_steps=0)
    lrnnx_zoo.from_pretrained(str(home / "ck"))                       # still a checkpoint
    done = export_folder(small_model(), "~/exp", format="torchscript", latency_steps=0)
    assert done.folder == home / "exp" and listing(home / "exp") == sorted(done.files)
    assert listing(tmp_path) == ["home"]                              # no literal "~" folder


def test_single_file_export_expands_the_home_folder(tmp_path, monkeypatch):
    from lrnnx_zoo.export import to_torchscript

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    to_torchscript(small_model(), "~/graphs/model.ts")
    assert (tmp_path / "home" / "graphs" / "model.ts").is_file() and not (tmp_path / "~").exists()


def test_pushing_an_export_into_a_checkpoint_repo_is_refused(tmp_path, local_hub):
    # export_folder(..., push_to_hub=REPO) into the checkpoint's own repo replaced its config.json and
    # card: the repo held an export's config.json beside model.safetensors and no longer loaded
    from lrnnx_zoo.hub_save import HubPublishError

    small_model().save_pretrained(tmp_path / "ck", push_to_hub=True, repo_id="me/model")
    before = set(local_hub.list_files("me/model"))
    with pytest.raises(HubPublishError, match=r"refusing to upload to 'me/model'.*export is complete in"):
        export_folder("me/model", tmp_path / "exp", format="torchscript", latency_steps=0, push_to_hub="me/model")
    assert set(local_hub.list_files("me/model")) == before
    lrnnx_zoo.from_pretrained("me/model")
    assert (tmp_path / "exp" / "model.ts").is_file()                  # the local export is kept


def test_pushing_a_checkpoint_into_an_export_or_foreign_repo_is_refused(tmp_path, local_hub):
    # the mirror of the test above: push_to_hub into an export's repo replaced its config.json and card
    # and left model.onnx beside the checkpoint (the repo was neither a working export nor only a
    # checkpoint); a repo of another library's model lost its config.json the same way
    from huggingface_hub import HfApi
    from lrnnx_zoo.hub_save import HubPublishError

    model = small_model()
    export_folder(model, tmp_path / "exp", format="onnx", latency_steps=0, push_to_hub="me/exp")
    HfApi().create_repo("me/other")
    HfApi().upload_file(path_or_fileobj=b'{"model_type": "bert"}', path_in_repo="config.json", repo_id="me/other")
    for repo, holds in (("me/exp", "an export"), ("me/other", "another model's config.json")):
        before = {f: local_hub.read_file(repo, f) for f in local_hub.list_files(repo)}
        with pytest.raises(HubPublishError, match=rf"refusing to upload a checkpoint to '{repo}': it holds "
                                                  rf"{holds}.*model in memory is unchanged"):
            model.push_to_hub(repo)
        with pytest.raises(HubPublishError, match=r"holds .*checkpoint files are in"):
            model.save_pretrained(tmp_path / repo.replace("/", "-"), push_to_hub=True, repo_id=repo)
        with pytest.raises(HubPublishError, match=rf"to '{repo}@dev'"):        # a new branch starts as main
            model.push_to_hub(repo, revision="dev")
        assert {f: local_hub.read_file(repo, f) for f in local_hub.list_files(repo)} == before
        assert lrnnx_zoo.from_pretrained(tmp_path / repo.replace("/", "-")) is not None   # the local half
    model.push_to_hub("me/model")                       # a checkpoint's own repo takes a new checkpoint
    model.push_to_hub("me/model")
    lrnnx_zoo.from_pretrained("me/model")


def test_replaced_folder_writes_through_a_symlink_and_keeps_it(tmp_path, swap_mode, monkeypatch):
    # the link itself was swapped: it became a real folder, the folder it named kept the old files,
    # and the link was left behind as the hidden sibling .link.tmp-XXXXXXXX (rmtree refuses links)
    real = tmp_path / "real"
    real.mkdir()
    (real / "mine.txt").write_text("mine")
    (tmp_path / "link").symlink_to("real")
    monkeypatch.chdir(tmp_path)
    with replaced_folder("link", keep=lambda name: True) as staging:     # relative, as users pass it
        (staging / "new.txt").write_text("new")
    assert (tmp_path / "link").is_symlink() and listing(real) == ["mine.txt", "new.txt"]
    assert listing(tmp_path) == ["link", "real"]


def test_replaced_folder_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with replaced_folder("~/out", keep=lambda name: True) as staging:
        (staging / "a").write_text("a")
    assert listing(tmp_path) == ["home"] and listing(tmp_path / "home" / "out") == ["a"]


@pytest.mark.parametrize("spelling", [".", "..", "../../ck", "LINK"])
def test_saving_over_the_folder_holding_the_working_directory_is_refused(tmp_path, monkeypatch, spelling):
    # the check compared paths as spelled: "../../ck" or a symlink to ck passed it, the folder was
    # swapped, and the process was left in a deleted working directory
    from lrnnx_zoo.hub import CheckpointError

    (tmp_path / "ck" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to("ck")
    monkeypatch.chdir(tmp_path / "ck" / "sub")
    given = str(tmp_path / "link") if spelling == "LINK" else spelling
    with pytest.raises(CheckpointError, match="current working directory"):
        small_model().save_pretrained(given)
    assert listing(tmp_path / "ck") == ["sub"] and listing(tmp_path) == ["ck", "link"]


def _interrupt_after(monkeypatch, owner, name, *, first_do_it, when=lambda *args: True):
    """Make ``owner.name`` raise KeyboardInterrupt (once, when ``when(*args)``), after doing its work
    if ``first_do_it``: an interrupt arriving just before or just after that call."""
    real = getattr(owner, name)
    fired = []

    def interrupted(*args, **kwargs):
        if fired or not when(*args):
            return real(*args, **kwargs)
        fired.append(name)
        if first_do_it:
            real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, name, interrupted)
    return fired


INTERRUPTS = {  # point -> (swap mode, what to patch, do the call first?, which call)
    "while carrying over the user's files": ("exchange", (folder_swap, "_link_or_copy"), False, None),
    "before the exchange": ("exchange", (folder_swap, "exchange_paths"), False, None),
    "after the exchange": ("exchange", (folder_swap, "exchange_paths"), True, None),
    "removing the old folder (exchange)": ("exchange", (folder_swap.shutil, "rmtree"), False, None),
    "after moving the old folder aside": ("two renames", (folder_swap.os, "rename"), True,
                                          lambda src, dst: ".old-" in str(dst)),
    "after moving the new folder in": ("two renames", (folder_swap.os, "rename"), True,
                                       lambda src, dst: ".tmp-" in str(src)),
    "removing the old folder (two renames)": ("two renames", (folder_swap.shutil, "rmtree"), False, None),
}


@pytest.mark.parametrize("point", list(INTERRUPTS))
def test_an_interrupt_anywhere_leaves_one_whole_folder_and_no_hidden_sibling(tmp_path, monkeypatch, point):
    # with two renames, an interrupt after the first left the path empty (the old folder stayed at
    # the hidden .t.old-*, the new one was deleted), and one while removing the old folder left it
    # there as .t.old-*
    mode, (owner, name), first_do_it, when = INTERRUPTS[point]
    if mode == "two renames":
        monkeypatch.setattr(folder_swap, "_RENAMEAT2", None)
    elif folder_swap._RENAMEAT2 is None:
        pytest.skip("no renameat2 here")
    target = tmp_path / "t"
    target.mkdir()
    (target / "ours.txt").write_text("old")
    (target / "mine.txt").write_text("mine")
    fired = _interrupt_after(monkeypatch, owner, name, first_do_it=first_do_it, when=when or (lambda *a: True))
    try:
        with replaced_folder(target, keep=lambda entry: entry != "ours.txt") as staging:
            (staging / "ours.txt").write_text("new")
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert fired, "the interrupt was never injected"
    assert listing(tmp_path) == ["t"]
    assert listing(target) == ["mine.txt", "ours.txt"] and (target / "mine.txt").read_text() == "mine"
    assert (target / "ours.txt").read_text() in ("old", "new")


def test_a_save_that_creates_the_folder_second_replaces_the_first(tmp_path, swap_mode, monkeypatch):
    # two processes saving to the same new folder (every DDP rank calling save_pretrained): the one
    # whose rename came second failed with "OSError: [Errno 39] Directory not empty" and lost its save
    target = tmp_path / "t"
    real_rename = folder_swap.os.rename

    landed = []

    def other_save_lands_first(src, dst):
        if str(dst) == str(target) and not landed:                  # after we looked, before we rename
            landed.append(dst)
            target.mkdir()
            (target / "ours.txt").write_text("first")
            (target / "mine.txt").write_text("mine")
        return real_rename(src, dst)

    monkeypatch.setattr(folder_swap.os, "rename", other_save_lands_first)
    with replaced_folder(target, keep=lambda entry: entry != "ours.txt") as staging:
        (staging / "ours.txt").write_text("second")
    monkeypatch.undo()
    assert listing(target) == ["mine.txt", "ours.txt"] and (target / "ours.txt").read_text() == "second"
    assert listing(tmp_path) == ["t"]


@pytest.fixture(params=["EBUSY", "EXDEV"])
def unmovable(request, tmp_path, monkeypatch, swap_mode):
    """The folder tmp_path/"t" as a mount point: renaming it fails as the kernel fails it (EBUSY for
    a mount point; EXDEV also when the sibling is on another mount, where files must be copied in)."""
    target = tmp_path / "t"
    code = getattr(errno, request.param)
    real_rename, real_replace = folder_swap.os.rename, folder_swap.os.replace

    def refuse(path):
        if str(path) == str(target):
            raise OSError(code, os.strerror(code), str(path))

    def rename(src, dst):
        refuse(src), refuse(dst)
        return real_rename(src, dst)

    def replace(src, dst):
        if request.param == "EXDEV" and str(src).startswith(str(tmp_path / ".t.tmp-")) and \
                os.path.dirname(dst) == str(target):
            raise OSError(code, os.strerror(code), str(src))          # the sibling is on the parent's mount
        return real_replace(src, dst)

    def exchange(a, b):
        refuse(a), refuse(b)

    monkeypatch.setattr(folder_swap.os, "rename", rename)
    monkeypatch.setattr(folder_swap.os, "replace", replace)
    monkeypatch.setattr(folder_swap, "exchange_paths", exchange)
    return target


def test_saving_into_a_mount_point_replaces_its_files(unmovable, tmp_path):
    # a folder that is a mount point (a container's output volume) cannot be renamed: every save and
    # export into it failed with "OSError: [Errno 16] Device or resource busy"
    target = unmovable
    target.mkdir()
    (target / "mine.txt").write_text("mine")
    small_model(seed=0).save_pretrained(target, metrics={"acc": 0.5})
    small_model(seed=1).save_pretrained(target, metrics={"acc": 0.75})
    loaded = lrnnx_zoo.from_pretrained(target)
    assert loaded.checkpoint_info["metrics"] == {"acc": 0.75}
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), small_model(seed=1).state_dict().values()))
    assert listing(target) == ["README.md", "config.json", "mine.txt", "model.safetensors"]
    assert listing(tmp_path) == ["t"]

    out = target / "export"
    out.mkdir()
    export_folder(small_model(), out, format="torchscript", latency_steps=0)
    export_folder(small_model(), out, format="onnx", latency_steps=0)    # nested: swapped as usual
    assert listing(out) == ["README.md", "config.json", "model.onnx", "step_form.safetensors"]


def test_reexport_into_a_mount_point_drops_the_earlier_graph(unmovable, tmp_path):
    out = unmovable
    out.mkdir()
    export_folder(small_model(), out, format="torchscript", latency_steps=0)
    (out / "notes.txt").write_text("mine")
    export_folder(small_model(), out, format="onnx", latency_steps=0)
    assert listing(out) == ["README.md", "config.json", "model.onnx", "notes.txt", "step_form.safetensors"]
    assert listing(tmp_path) == ["t"]


def _as_normal_user(cmd):
    """``cmd`` run so that file permissions apply (root overrides them): via setpriv when root."""
    import shutil as sh
    if os.geteuid() != 0:
        return cmd
    if sh.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    caps = "-dac_override,-dac_read_search,-fowner"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *cmd]


_SAVE_TWICE = """
import sys, torch, lrnnx_zoo
torch.manual_seed(0)
cfg = lrnnx_zoo.ModelConfig(layer="s4d", d_input=3, d_output=2, d_model=8, n_layers=1, layer_kwargs={"d_state": 4})
for acc in (0.5, 0.75):
    lrnnx_zoo.SequenceModel(cfg).save_pretrained(sys.argv[1], metrics={"acc": acc})
print(lrnnx_zoo.from_pretrained(sys.argv[1]).checkpoint_info["metrics"])
"""


def test_saving_into_a_writable_folder_under_a_read_only_parent(tmp_path):
    # a writable volume under a read-only root (a container with readOnlyRootFilesystem): the save was
    # refused because the hidden sibling could not be made in the parent
    import subprocess
    import sys
    vol = tmp_path / "ro" / "vol"
    vol.mkdir(parents=True)
    (vol / "mine.txt").write_text("mine")
    os.chmod(tmp_path / "ro", 0o555)
    try:
        run = subprocess.run(_as_normal_user([sys.executable, "-c", _SAVE_TWICE, str(vol)]),
                             capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    assert run.returncode == 0 and "{'acc': 0.75}" in run.stdout, run.stderr
    assert listing(vol) == ["README.md", "config.json", "mine.txt", "model.safetensors"]
    assert listing(tmp_path / "ro") == ["vol"]


_SAVE_OVER_A_READ_ONLY_SUBFOLDER = """
import os, sys, torch, lrnnx_zoo
torch.manual_seed(0)
cfg = lrnnx_zoo.ModelConfig(layer="s4d", d_input=3, d_output=2, d_model=8, n_layers=1, layer_kwargs={"d_state": 4})
model = lrnnx_zoo.SequenceModel(cfg)
model.save_pretrained(sys.argv[1])
model.save_pretrained(sys.argv[1])
print("saved")
"""


def test_a_read_only_subfolder_of_the_user_leaves_no_hidden_sibling(tmp_path):
    # the old folder's read-only data/ could not be emptied: each save left a .ck.tmp-* holding it
    import subprocess
    import sys
    ck = tmp_path / "ck"
    (ck / "data" / "deep").mkdir(parents=True)
    (ck / "data" / "deep" / "raw.csv").write_text("1,2\n")
    os.chmod(ck / "data" / "deep", 0o555)
    os.chmod(ck / "data", 0o555)
    try:
        run = subprocess.run(_as_normal_user([sys.executable, "-c", _SAVE_OVER_A_READ_ONLY_SUBFOLDER, str(ck)]),
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "saved" in run.stdout, run.stderr
        assert listing(tmp_path) == ["ck"]
        assert (ck / "data" / "deep" / "raw.csv").read_text() == "1,2\n"
        assert (ck / "data").stat().st_mode & 0o777 == 0o555
    finally:
        for root, dirs, _ in os.walk(tmp_path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown to another user needs root")
def test_a_replaced_folder_keeps_its_owner_and_group(tmp_path, swap_mode):
    # root saving into a user's (or a team's) folder made it root:root, so they could no longer write in it
    target = tmp_path / "t"
    target.mkdir(mode=0o2775)
    os.chown(target, 1234, 5678)
    os.chmod(target, 0o2775)
    with replaced_folder(target, keep=lambda name: True) as staging:
        (staging / "a").write_text("a")
    st = target.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 5678, 0o2775)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fd's folder through /proc")
def test_the_swap_is_flushed_to_disk_after_the_rename(tmp_path, swap_mode, monkeypatch):
    # a rename survives a power cut only once its folder is flushed; the files' own fsync does not
    # cover their names. Record which folders are flushed and what the target held at that moment.
    target = tmp_path / "t"
    target.mkdir()
    (target / "f").write_text("old")
    flushed = []
    real_fsync = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.isdir(path):
            flushed.append((path, (target / "f").read_text() if (target / "f").exists() else None))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with replaced_folder(target, keep=lambda name: True) as staging:
        (staging / "f").write_text("new")
    assert (str(tmp_path), "new") in flushed          # the parent, after the swap
    fresh = tmp_path / "fresh"
    with replaced_folder(fresh, keep=lambda name: True) as staging:
        (staging / "g").write_text("x")
    assert [p for p, _ in flushed].count(str(tmp_path)) == 2     # a new folder's creation too


# Session 28 (a file-handling fuzzer): a save or export into an existing folder re-created the
# folder's whole tree (hard links, or copies where links failed) and swapped it in. `--out ~`
# re-linked all of a home folder; a mounted volume inside the folder was copied onto the parent's
# disk and then emptied with the old folder. Now a folder that holds nothing the write replaces only
# gains the new files, and one whose kept entries are large or hold a mount point is updated in place.

def _identity(path):
    st = os.lstat(path)
    return st.st_ino, st.st_nlink


def test_a_folder_without_a_checkpoint_only_gains_the_files(tmp_path, swap_mode):
    target = tmp_path / "project"
    (target / "data" / "deep").mkdir(parents=True)
    for i in range(20):
        (target / "data" / "deep" / f"{i}.bin").write_bytes(b"x" * 10)
    (target / ".bashrc").write_text("mine")
    before = {p: _identity(p) for p in [target, *target.rglob("*")]}
    small_model().save_pretrained(target)
    # the folder and every entry of the user's are the same files (not swapped, linked or copied)
    assert {p: _identity(p) for p in before} == before
    assert listing(target) == [".bashrc", "README.md", "config.json", "data", "model.safetensors"]
    assert lrnnx_zoo.from_pretrained(target) is not None and listing(tmp_path) == ["project"]


def test_a_checkpoint_beside_a_large_tree_is_updated_in_place(tmp_path, monkeypatch, swap_mode):
    monkeypatch.setattr(folder_swap, "CARRY_LIMIT", 8)
    target = tmp_path / "run"
    small_model(seed=0).save_pretrained(target, metrics={"acc": 0.5})
    (target / "dataset").mkdir()
    for i in range(10):
        (target / "dataset" / f"{i}.csv").write_text("1,2")
    kept = {p: _identity(p) for p in [target, *(target / "dataset").rglob("*")]}
    small_model(seed=1).save_pretrained(target, metrics={"acc": 0.75})
    assert {p: _identity(p) for p in kept} == kept
    assert lrnnx_zoo.from_pretrained(target).checkpoint_info["metrics"] == {"acc": 0.75}
    assert listing(target) == ["README.md", "config.json", "dataset", "model.safetensors"]
    assert listing(tmp_path) == ["run"]
    monkeypatch.setattr(folder_swap, "CARRY_LIMIT", 2000)         # a small tree: swapped whole, as before
    small_model(seed=2).save_pretrained(target, metrics={"acc": 0.25})
    assert _identity(target)[0] != kept[target][0] and (target / "dataset" / "0.csv").read_text() == "1,2"


def test_a_mounted_volume_inside_a_checkpoint_folder_is_left_alone(tmp_path):
    import subprocess
    target = tmp_path / "run"
    small_model(seed=0).save_pretrained(target)
    vol = target / "vol"
    vol.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(vol)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (vol / "data.txt").write_text("on the volume")
        small_model(seed=1).save_pretrained(target, metrics={"acc": 0.75})
        assert os.path.ismount(vol) and (vol / "data.txt").read_text() == "on the volume"
        assert lrnnx_zoo.from_pretrained(target).checkpoint_info["metrics"] == {"acc": 0.75}
        assert listing(tmp_path) == ["run"]
    finally:        # wherever the volume went (an old save moved it under a hidden sibling)
        with open("/proc/mounts") as mounts:
            under = [line.split()[1] for line in mounts if line.split()[1].startswith(str(tmp_path))]
        for path in sorted(under, key=len, reverse=True):
            subprocess.run(["umount", path], capture_output=True)


def test_a_full_disk_while_copying_into_a_mount_point_replaces_nothing(unmovable, tmp_path, monkeypatch):
    # The files were copied and renamed one at a time: ENOSPC on the weights left the new
    # config.json and card beside the old weights, a checkpoint that no longer loaded.
    target = unmovable
    target.mkdir()
    small_model(seed=0).save_pretrained(target, metrics={"acc": 0.5})
    before = {name: (target / name).read_bytes() for name in listing(target)}
    real_copy = folder_swap.shutil.copy2

    def copy2(src, dst, **kwargs):
        if os.path.basename(str(src)) == "model.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_copy(src, dst, **kwargs)
    monkeypatch.setattr(folder_swap.shutil, "copy2", copy2)
    try:
        small_model(seed=1).save_pretrained(target, metrics={"acc": 0.75})
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
        assert {name: (target / name).read_bytes() for name in listing(target)} == before
    else:                           # EBUSY: the sibling is on the same disk, renamed in, nothing copied
        assert lrnnx_zoo.from_pretrained(target).checkpoint_info["metrics"] == {"acc": 0.75}
    assert lrnnx_zoo.from_pretrained(target) is not None and listing(tmp_path) == ["t"]
