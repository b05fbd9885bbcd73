"""Training snapshots, resuming an interrupted run, fine-tuning from a checkpoint (``init_from``)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrnnx_zoo import cli, from_pretrained, training
from lrnnx_zoo import training_state as TS
from lrnnx_zoo.recipes import DataSpec, get_recipe, override
from lrnnx_zoo.training import ResumeNotExactWarning, TrainingSetupError, train
from lrnnx_zoo.training_state import SnapshotError
from lrnnx_zoo.wording import command_line

pytest.importorskip("sklearn")  # the digits ship with scikit-learn
pytest.importorskip("safetensors")

# digits-tiny with dropout and shift augmentation, so that the global generator and the augmentation
# generator both matter, and with 5 steps per epoch (320 training digits, batches of 64) over 3
# epochs, so that runs stop and resume inside an epoch: 15 optimiser steps of a one-block S4D of width 8.
_TINY = get_recipe("digits-tiny")
RECIPE = dataclasses.replace(
    _TINY, name="digits-tiny-resume", model={**_TINY.model, "dropout": 0.1},
    data=DataSpec("digits", {"seed": 0, "n_test": 1477, "augment": "shift"}),
    optim=dataclasses.replace(_TINY.optim, batch_size=64, epochs=3), max_steps=None)


def _weights(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(a: dict, b: dict) -> bool:
    """Bit for bit: same process, same threads, deterministic algorithms, so no tolerance."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _steps(out: Path) -> list:
    return [step for step, _ in TS.list_snapshots(TS.snapshot_root(out))]


@pytest.fixture(scope="module")
def uninterrupted():
    """(weights, metrics) of RECIPE trained in one go, without snapshots."""
    model, metrics = train(RECIPE, progress=False)
    return _weights(model), metrics


@pytest.fixture(scope="module")
def finished(tmp_path_factory, uninterrupted):
    """A finished run of RECIPE that wrote snapshots every 5 steps (so at 10 and 15: two are kept)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    model, metrics = train(RECIPE, out_dir=str(out), progress=False, checkpoint_every=5)
    # Taking snapshots (reading generator states, packing the optimiser) does not change the run.
    assert _same_weights(_weights(model), uninterrupted[0]) and metrics == uninterrupted[1]
    return out


def _interrupt_at(monkeypatch, batch: int) -> None:
    """Make the batch_loss call number ``batch`` raise KeyboardInterrupt (Ctrl-C during that step)."""
    real, calls = training.batch_loss, [0]

    def loss(*args, **kwargs):
        calls[0] += 1
        if calls[0] == batch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(training, "batch_loss", loss)


def test_an_interrupted_run_resumed_twice_ends_as_the_uninterrupted_run_bit_for_bit(tmp_path, monkeypatch,
                                                                                     uninterrupted):
    # Before: only the final checkpoint was written, so a run interrupted at step 7 of 15 was lost.
    out = tmp_path / "run"
    _interrupt_at(monkeypatch, 8)                      # during step 8: steps 3 and 6 are snapshotted
    with pytest.raises(KeyboardInterrupt):
        train(RECIPE, out_dir=str(out), progress=False, checkpoint_every=3)
    monkeypatch.undo()
    assert _steps(out) == [3, 6] and not (out / "config.json").exists()
    record = json.loads((TS.snapshot_folder(TS.snapshot_root(out), 6) / TS.STATE_NAME).read_text())
    assert (record["step"], record["epoch"], record["batch_in_epoch"]) == (6, 1, 1)

    _interrupt_at(monkeypatch, 5)                      # resumed at 6, interrupted again in step 11
    with pytest.raises(KeyboardInterrupt):
        train(RECIPE, out_dir=str(out), progress=False, checkpoint_every=3, resume=True)
    monkeypatch.undo()
    assert _steps(out) == [6, 9]                       # the newest two are kept

    model, metrics = train(RECIPE, out_dir=str(out), progress=False, checkpoint_every=3, resume=True)
    weights, expected_metrics = uninterrupted
    assert _same_weights(_weights(model), weights) and metrics == expected_metrics
    assert model.checkpoint_info["notes"].endswith("Interrupted and resumed from its training snapshots at step 6, 9.")
    loaded = from_pretrained(str(out))                 # the checkpoint folder ignores training_state/
    assert _same_weights(_weights(loaded), weights) and loaded.checkpoint_info["metrics"] == metrics
    assert _steps(out) == [12, 15]


def test_snapshots_beside_the_checkpoint_leave_loading_and_evaluation_alone(finished, capsys):
    assert _steps(finished) == [10, 15]
    assert sorted(p.name for p in finished.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                          "training_state"]
    assert cli.main(["evaluate", str(finished), "--check"]) == 0, capsys.readouterr()
    record = json.loads((TS.snapshot_folder(TS.snapshot_root(finished), 15) / TS.STATE_NAME).read_text())
    assert record["run"]["recipe"]["seed"] == 0 and record["world_size"] == 1 and "optimizer" in record


def test_a_snapshot_of_another_run_is_refused_naming_what_differs(finished, tmp_path, capsys):
    other = tmp_path / "other"
    with pytest.raises(SnapshotError, match=r"belongs to another run: seed is 0 there, 1 in this run\. .*"
                                            r"train lrnnx_zoo\.recipes\.override\(recipe, seed=0\) to continue it"):
        train(RECIPE, out_dir=str(other), seed=1, resume=str(finished), progress=False)
    longer = override(RECIPE, epochs=4)
    with pytest.raises(SnapshotError, match=r"optim\.epochs is 3 there, 4 in this run\. .*override\(recipe, epochs=3\)"):
        train(longer, out_dir=str(other), resume=str(finished), progress=False)
    wider = dataclasses.replace(RECIPE, model={**RECIPE.model, "d_model": 16})
    with pytest.raises(SnapshotError, match=r"model\.d_model is 8 there, 16 in this run\. .*same recipe"):
        train(wider, out_dir=str(other), resume=str(finished), progress=False)
    assert not other.exists()
    # The command line says it in one line, as a usage error.
    assert cli.main(["train", "digits-tiny", "--out", str(other), "--resume", str(finished), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lrnnx-zoo train: the snapshot {finished / 'training_state'}") and err.count("\n") == 1
    assert "override(" not in err and "resume with the same recipe" in err, err


def test_the_settings_that_match_a_snapshot_are_worded_for_the_caller():
    differ = [("seed", 0, 1), ("optim.epochs", 3, 4)]
    assert TS._matching_settings(differ) == "train lrnnx_zoo.recipes.override(recipe, seed=0, epochs=3) "
    with command_line(cli.FLAGS):
        assert TS._matching_settings(differ) == "pass --seed 0 --epochs 3 "
    assert TS._matching_settings(differ + [("model.d_model", 8, 16)]) is None


def test_a_damaged_snapshot_is_an_error_that_names_the_older_intact_one(finished, tmp_path, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    root = TS.snapshot_root(out)
    newest, older = TS.snapshot_folder(root, 15), TS.snapshot_folder(root, 10)
    data = (newest / TS.TENSORS_NAME).read_bytes()
    (newest / TS.TENSORS_NAME).write_bytes(data[:len(data) // 2])     # truncated, e.g. a disk that filled up
    with pytest.raises(SnapshotError, match=rf"the snapshot {newest} is damaged: state\.safetensors has sha256 .*"
                                            rf"The older snapshot {older} is intact: resume from it with "
                                            rf"resume='{older}'$"):
        train(RECIPE, out_dir=str(out), resume=True, progress=False)
    # ... and resuming from it as told finishes the run as if nothing had happened (also without an
    # out_dir: then nothing is written, though the run took snapshots before).
    model, metrics = train(RECIPE, resume=str(older), progress=False)
    assert _same_weights(_weights(model), uninterrupted[0]) and metrics == uninterrupted[1]

    shutil.rmtree(older)
    (newest / TS.STATE_NAME).write_text('{"format": "lrnnx-zoo-training-sta')
    with pytest.raises(SnapshotError, match=r"state\.json is not readable JSON .*no older intact snapshot"):
        train(RECIPE, out_dir=str(out), resume=True, progress=False)


def test_a_kill_while_a_snapshot_is_written_leaves_the_previous_ones_to_resume_from(tmp_path, capsys):
    # A real SIGKILL (no clean-up runs) in the middle of writing the third snapshot's tensors
    # (digits-tiny: 8 steps, a snapshot every 2).
    out = tmp_path / "run"
    script = tmp_path / "killed.py"
    script.write_text(
        "import os, signal, sys\n"
        "from lrnnx_zoo import cli, training_state\n"
        "real, calls = training_state.write_safetensors, []\n"
        "def write(tensors, path, metadata):\n"
        "    real(tensors, path, metadata)\n"
        "    calls.append(path)\n"
        "    if len(calls) == 3:\n"
        "        path.write_bytes(path.read_bytes()[:1000])\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "training_state.write_safetensors = write\n"
        f"sys.exit(cli.main(['train', 'digits-tiny', '--out', {str(out)!r}, '--checkpoint-every', '2', "
        "'--no-progress']))\n")
    threads = str(torch.get_num_threads())  # as here: the thread count decides float summation order
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": threads})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert _steps(out) == [2, 4]
    assert [p.name for p in TS.snapshot_root(out).iterdir() if p.name.startswith(".step-00000006.tmp-")]

    assert cli.main(["train", "digits-tiny", "--out", str(out), "--resume", "--no-progress"]) == 0
    resumed = from_pretrained(str(out))
    expected, _ = train("digits-tiny", progress=False)
    assert _same_weights(_weights(resumed), _weights(expected))
    assert "Interrupted and resumed from its training snapshot at step 4." in resumed.checkpoint_info["notes"]
    # The resumed run snapshots every 2 steps as the killed one did, and removed what the kill left.
    assert sorted(p.name for p in TS.snapshot_root(out).iterdir()) == ["step-00000006", "step-00000008"]


def test_a_resume_on_another_thread_count_or_torch_warns_that_it_is_not_the_same_run_bit_for_bit(finished, tmp_path,
                                                                                                   monkeypatch):
    # The thread count decides the order of float sums (digits-tiny on 1 and 2 threads ends on other
    # weights), yet only another number of processes or device warned: a job resumed on a machine
    # with another core count silently ended off the uninterrupted run the card's command reproduces.
    import warnings
    at_10 = TS.snapshot_folder(TS.snapshot_root(finished), 10)
    written = torch.get_num_threads()
    assert json.loads((at_10 / TS.STATE_NAME).read_text())["threads"] == written
    with warnings.catch_warnings():                      # the same setup: no warning
        warnings.simplefilter("error", ResumeNotExactWarning)
        train(RECIPE, out_dir=str(tmp_path / "same"), resume=str(at_10), progress=False)
    torch.set_num_threads(written + 1)
    try:
        with pytest.warns(ResumeNotExactWarning, match=rf"written by 1 process on cpu with {written} threads? each, "
                                                       rf"this run has 1 process on cpu with {written + 1} threads each: "
                                                       r"it goes on, but matches the uninterrupted run only to float"):
            train(RECIPE, out_dir=str(tmp_path / "threads"), resume=str(at_10), progress=False)
    finally:
        torch.set_num_threads(written)
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    with pytest.warns(ResumeNotExactWarning, match=r"written by 1 process on cpu, torch 2\.\d+\.\d+\S*, this run has "
                                                   r"1 process on cpu, torch 2\.99\.0: it goes on"):
        train(RECIPE, out_dir=str(tmp_path / "torch"), resume=str(at_10), progress=False)


def test_a_snapshot_of_another_float_dtype_is_refused(finished, tmp_path, float64_default):
    # Session 28 (a training fuzzer): a float32 run's snapshot resumed under a float64 default (or the
    # reverse) went on silently in the other precision, its weights and AdamW moments cast, and saved
    # a checkpoint trained half in each.
    at_10 = TS.snapshot_folder(TS.snapshot_root(finished), 10)
    with pytest.raises(SnapshotError, match=rf"^the snapshot {at_10} holds float32 weights, but this run builds "
                                            r"float64 ones \(torch.get_default_dtype\(\)\): resuming would cast the "
                                            r"weights and optimiser state and go on in another precision. Continue it "
                                            r"under torch.set_default_dtype\(torch.float32\), as it started"):
        train(RECIPE, out_dir=str(tmp_path / "wide"), resume=str(at_10), progress=False)
    assert not (tmp_path / "wide").exists()


def test_snapshot_and_resume_arguments_are_checked_before_training(finished, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "_run", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(TrainingSetupError, match=r"checkpoint_every writes training snapshots into "
                                                 r"out_dir/training_state, but no out_dir was given"):
        train(RECIPE, checkpoint_every=5)
    with pytest.raises(TypeError, match=r"checkpoint_every must be None, a positive int .* got 2\.5"):
        train(RECIPE, out_dir=str(tmp_path / "a"), checkpoint_every=2.5)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive number of optimiser steps or 'epoch'"):
        train(RECIPE, out_dir=str(tmp_path / "a"), checkpoint_every=0)
    with pytest.raises(TrainingSetupError, match="resume=True continues from the newest snapshot in out_dir, but no"):
        train(RECIPE, resume=True)
    with pytest.raises(SnapshotError, match=r"no training snapshot to resume from in .*a/training_state \(out_dir\)"):
        train(RECIPE, out_dir=str(tmp_path / "a"), resume=True)
    # A fresh run into a folder with another run's snapshots: a later resume would continue that one.
    with pytest.raises(TrainingSetupError, match=r"holds training snapshots of an earlier run \(the newest at step "
                                                 r"15, .*\): pass resume=True to continue"):
        train(RECIPE, out_dir=str(finished))
    for bad, shown in (("0", "0"), ("often", "'often'")):
        with pytest.raises(SystemExit):
            cli.main(["train", "digits-tiny", "--out", str(tmp_path / "b"), "--checkpoint-every", bad])
        assert f"expected a positive integer (optimiser steps) or 'epoch', got {shown}" in capsys.readouterr().err


def test_checkpoint_every_epoch_snapshots_at_each_epochs_end(tmp_path):
    out = tmp_path / "run"
    train(RECIPE, out_dir=str(out), progress=False, checkpoint_every="epoch")
    assert _steps(out) == [10, 15]                     # 5 steps per epoch; the newest two are kept


def test_init_from_starts_from_a_checkpoints_weights_and_the_card_says_so(finished, tmp_path, monkeypatch):
    start = from_pretrained(str(finished))
    seen = []
    real = training.batch_loss

    def first_loss(net, *args):
        if not seen:
            seen.append(_weights(net))
        return real(net, *args)
    monkeypatch.setattr(training, "batch_loss", first_loss)
    tune = dataclasses.replace(RECIPE, seed=3, model={**RECIPE.model, "dropout": 0.0})   # dropout may differ
    model, _ = train(tune, out_dir=str(tmp_path / "tuned"), progress=False, init_from=str(finished))
    monkeypatch.undo()
    assert _same_weights(seen[0], _weights(start))
    info = model.checkpoint_info
    assert (f"Fine-tuned: started from the weights of {finished} (weights digest "
            f"{start.checkpoint_info['weights_digest'][:16]}), not from random ones.") in info["notes"]
    assert f"train(recipe, out_dir={str(tmp_path / 'tuned')!r}, init_from={str(finished)!r})" in info["command"]
    card = (tmp_path / "tuned" / "README.md").read_text()
    assert "Fine-tuned: started from the weights of" in card

    shipped = training.reproduce_command(get_recipe("digits-tiny"), "out", init_from="digits-tiny-base")
    assert shipped.endswith("--seed 0 --init-from digits-tiny-base")


def test_init_from_another_model_or_nothing_loadable_is_refused_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "_run", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(TrainingSetupError, match=r"init_from='digits-s4d' holds another model than recipe "
                                                 r"'digits-tiny' trains: d_model is 64 there, 8 in the recipe; .*"
                                                 r"n_layers is 4 there, 1 in the recipe"):
        train("digits-tiny", init_from="digits-s4d")
    with pytest.raises(TrainingSetupError, match=r"init_from='.*nowhere': no checkpoint"):
        train("digits-tiny", init_from=str(tmp_path / "nowhere"))
    with pytest.raises(TypeError, match="init_from must be a checkpoint folder"):
        train("digits-tiny", init_from=3)
    assert cli.main(["train", "digits-tiny", "--out", str(tmp_path / "o"), "--init-from", "digits-lru"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrnnx-zoo train: --init-from digits-lru holds another model") and err.count("\n") == 1


def test_a_resumed_fine_tuning_run_keeps_its_initial_weights_and_refuses_others(finished, tmp_path, monkeypatch):
    tune = dataclasses.replace(RECIPE, seed=3)
    expected, _ = train(tune, progress=False, init_from=str(finished))
    out = tmp_path / "tuned"
    _interrupt_at(monkeypatch, 9)
    with pytest.raises(KeyboardInterrupt):
        train(tune, out_dir=str(out), progress=False, init_from=str(finished), checkpoint_every=4)
    monkeypatch.undo()
    other = tmp_path / "other"
    expected.save_pretrained(other)
    with pytest.raises(SnapshotError, match=rf"belongs to a run that started from '{finished}' \(weights digest "
                                            rf"\w+\), but init_from='{other}' holds other weights"):
        train(tune, out_dir=str(out), resume=True, init_from=str(other), progress=False)
    with pytest.raises(SnapshotError, match="started from random weights, but init_from="):
        train(RECIPE, out_dir=str(tmp_path / "x"), resume=str(finished), init_from=str(finished), progress=False)
    model, _ = train(tune, out_dir=str(out), resume=True, progress=False)   # no init_from: the snapshot's
    assert _same_weights(_weights(model), _weights(expected))
    assert "Fine-tuned: started from the weights of" in model.checkpoint_info["notes"]


def _free_port() -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=str(script.parent),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_under_torchrun_rank_0_writes_the_snapshots_and_every_rank_resumes_from_one(tmp_path):
    # Two gloo processes with dropout: each rank draws its own masks, so the resumed run ends on the
    # uninterrupted run's weights only if every rank got back its own generator, optimiser and step.
    from safetensors.torch import load_file
    log = tmp_path / "writes.log"
    script = tmp_path / "run.py"
    script.write_text(
        "import dataclasses, os, sys\n"
        "from lrnnx_zoo import recipes, training_cli, training_state\n"
        "tiny = recipes.get_recipe('digits-tiny')\n"
        f"recipes.RECIPES['digits-tiny-resume'] = dataclasses.replace(tiny, name='digits-tiny-resume', "
        f"model={RECIPE.model!r}, data=recipes.DataSpec('digits', {RECIPE.data.params!r}), "
        f"optim=dataclasses.replace(tiny.optim, batch_size=64, epochs=3), max_steps=None)\n"
        "real = training_state.write_snapshot\n"
        "def write(*args, **kwargs):\n"
        f"    with open({str(log)!r}, 'a') as fh:\n"
        "        fh.write(os.environ['RANK'] + '\\n')\n"
        "    return real(*args, **kwargs)\n"
        "training_state.write_snapshot = write\n"
        "sys.exit(training_cli.main(sys.argv[1:]))\n")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    proc = _torchrun(script, "train", "digits-tiny-resume", "--out", str(whole), "--checkpoint-every", "5",
                     "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert log.read_text().split() == ["0", "0", "0"] and _steps(whole) == [10, 15]
    record = json.loads((TS.snapshot_folder(TS.snapshot_root(whole), 10) / TS.STATE_NAME).read_text())
    assert record["world_size"] == 2
    assert load_file(str(TS.snapshot_folder(TS.snapshot_root(whole), 10) / TS.TENSORS_NAME)).keys() >= {
        "rng.cpu.0", "rng.cpu.1", "rng.augment"}

    at_10 = TS.snapshot_folder(TS.snapshot_root(whole), 10)
    proc = _torchrun(script, "train", "digits-tiny-resume", "--out", str(resumed), "--resume", str(at_10),
                     "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning" not in proc.stderr
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert log.read_text().split() == ["0"] * 4 and _steps(resumed) == [15]      # snapshots every 5, as before

    # On one process the run goes on, with a warning that it is no longer the same run bit for bit.
    with pytest.warns(ResumeNotExactWarning, match=r"written by 2 processes on cpu( with 1 thread each)?, this run "
                                                   r"has 1 process on cpu( with \d+ threads? each)?: it goes on, but "
                                                   r"matches the uninterrupted run only to float"):
        train(RECIPE, out_dir=str(tmp_path / "single"), resume=str(at_10), progress=False)


def test_the_command_line_says_where_an_interrupted_run_can_go_on_from(tmp_path, monkeypatch, capsys):
    # Ctrl-C showed a KeyboardInterrupt traceback and left the user to find the snapshot.
    out = tmp_path / "run"
    _interrupt_at(monkeypatch, 6)
    assert cli.main(["train", "digits-tiny", "--out", str(out), "--checkpoint-every", "2", "--no-progress"]) == 130
    snapshot = TS.snapshot_folder(TS.snapshot_root(out), 4)
    assert capsys.readouterr().err == (f"lrnnx-zoo train: interrupted (--out {out}: the newest training snapshot is "
                                       f"{snapshot}; add --resume to the same command to continue from it)\n")
    monkeypatch.undo()
    _interrupt_at(monkeypatch, 1)
    assert cli.main(["train", "digits-tiny", "--out", str(tmp_path / "none"), "--no-progress"]) == 130
    assert capsys.readouterr().err.endswith(f"(--out {tmp_path / 'none'}: nothing was saved)\n")


def test_an_empty_resume_path_is_refused_not_a_fresh_run(tmp_path, capsys):
    # `--resume ""` (an unset shell variable) trained from scratch, exit 0: the CLI read "" as no resume
    with pytest.raises(TrainingSetupError, match=r"^resume got an empty path; pass a snapshot \(or the folder "
                                                 r"holding them\), or resume=True for the newest in out_dir$"):
        train(RECIPE, out_dir=str(tmp_path / "a"), resume="", progress=False)
    assert cli.main(["train", "digits-tiny", "--out", str(tmp_path / "b"), "--resume", "", "--no-progress"]) == 2
    assert capsys.readouterr().err == ("lrnnx-zoo train: --resume got an empty path; pass a snapshot (or the folder "
                                       "holding them), or --resume for the newest in --out\n")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("entry", ["lrnnx-zoo", "training_cli"])
def test_sigterm_says_where_the_run_can_go_on_from_as_ctrl_c_does(entry, tmp_path, monkeypatch, capsys):
    # Session 28: SIGTERM (a job scheduler's stop) ended `lrnnx-zoo train` with exit 143 and no word
    # of the snapshot to resume from. Session 31: `python -m lrnnx_zoo.training_cli train`, the module
    # torchrun launches (and stops with SIGTERM when a worker fails), still died without it.
    from lrnnx_zoo import training_cli
    main = cli.main if entry == "lrnnx-zoo" else training_cli.main
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("Python runs signal handlers on the main thread only")
    real, calls = training.batch_loss, [0]

    def loss(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(training, "batch_loss", loss)
    out = tmp_path / "run"
    outside = []

    def callers(*_):        # the caller's handler: it gets the signal where the CLI has none (no kill)
        outside.append(1)
    before = signal.signal(signal.SIGTERM, callers)
    try:
        code = main(["train", "digits-tiny", "--out", str(out), "--checkpoint-every", "2", "--no-progress"])
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert code == 143 and not outside and after is callers          # the caller's handler put back
    snapshot = TS.snapshot_folder(TS.snapshot_root(out), 4)
    assert capsys.readouterr().err == (f"lrnnx-zoo train: terminated by SIGTERM (--out {out}: the newest training "
                                       f"snapshot is {snapshot}; add --resume to the same command to continue from it)\n")
    monkeypatch.undo()
    assert main(["train", "digits-tiny", "--out", str(out), "--resume", "--no-progress"]) == 0


def test_resuming_another_runs_snapshot_into_a_folder_with_snapshots_is_refused(finished, tmp_path):
    # it wrote this run's snapshots among the other run's (one replaced, one kept): a later resume=True
    # in that folder picked the other run's step
    before = _steps(finished)
    other = tmp_path / "other" / "training_state" / "step-00000003"
    with pytest.raises(TrainingSetupError, match=r"holds training snapshots of a run .* and resuming .* there would "
                                                 r"write this run's snapshots among them"):
        train(RECIPE, out_dir=str(finished), resume=str(other), progress=False)
    assert _steps(finished) == before


def test_a_resume_from_the_last_steps_snapshot_is_not_called_an_interruption(finished, tmp_path):
    run = tmp_path / "again"
    shutil.copytree(finished, run)
    model, _ = train(RECIPE, out_dir=str(run), resume=True, checkpoint_every=5, progress=False)
    notes = model.checkpoint_info["notes"]
    assert "Interrupted" not in notes and "Reloaded from its training snapshot of the last step (15)" in notes
