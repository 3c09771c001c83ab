"""The shared training loop: Ctrl+C finishes the step, checkpoints it, then stops; the run resumes there, and its
log reads as one run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bonsai.train.loop import TrainConfig, train


def _batches():
    gen = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(4, 8, generator=gen)


# Run in a process of its own, with SIGINT at Python's default as in a terminal: a test run started in the
# background of a non-interactive shell (nohup, `&`) inherits SIGINT ignored, which Python keeps and the loop
# rightly leaves alone, so the raised signal would do nothing.
CTRL_C_RUN = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
import torch
from torch import nn
from bonsai.train.loop import TrainConfig, train
from test_train_loop import _batches

calls = [0]

def loss_fn(net, x):  # Ctrl+C arrives in the middle of the third step's forward
    calls[0] += 1
    if calls[0] == 3:
        signal.raise_signal(signal.SIGINT)
    return (net(x) - x).pow(2).mean()

cfg = TrainConfig(steps=10, lr=1e-2, warmup=1, log_every=1, checkpoint_every=100, compile=False)
torch.manual_seed(0)
model = nn.Linear(8, 8)
try:
    train(model, loss_fn, _batches(), cfg, sys.argv[1])
except KeyboardInterrupt:
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the handler was not restored"
    torch.save(model.state_dict(), sys.argv[1] + "/model-at-interrupt.pt")
    sys.exit(130)
"""


def test_ctrl_c_checkpoints_the_finished_step_and_the_run_resumes_there(tmp_path, capsys):
    run = subprocess.run([sys.executable, "-c", CTRL_C_RUN, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])})
    assert run.returncode == 130, run.stdout + run.stderr
    assert "saving a checkpoint after this step" in run.stdout
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    assert saved["step"] == 3  # the interrupted step was finished, not lost with the two before it
    model = torch.load(tmp_path / "model-at-interrupt.pt", weights_only=True)
    torch.testing.assert_close(saved["model"]["weight"], model["weight"], rtol=0, atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    resumed = train(nn.Linear(8, 8), lambda net, x: (net(x) - x).pow(2).mean(), _batches(), TrainConfig(
        steps=10, lr=1e-2, warmup=1, log_every=1, checkpoint_every=100, compile=False), tmp_path)
    assert resumed.step == 10 and "at step 3" in capsys.readouterr().out


def test_resume_from_an_older_checkpoint_logs_each_step_once(tmp_path):
    """A run killed after logging step 7 with its last checkpoint at step 5 (as SIGKILL leaves it) resumes
    at step 5; the log drops the records of steps 6 and 7 it will write again."""
    calls = [0]

    def dies_in_step_8(net, x):
        calls[0] += 1
        if calls[0] == 8:
            raise RuntimeError("killed")
        return (net(x) - x).pow(2).mean()

    cfg = TrainConfig(steps=10, lr=1e-2, warmup=1, log_every=1, checkpoint_every=5, compile=False)
    with pytest.raises(RuntimeError, match="killed"):
        train(nn.Linear(8, 8), dies_in_step_8, _batches(), cfg, tmp_path)
    log = tmp_path / "log.jsonl"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5, 6, 7]
    first_run = log.read_text().splitlines()[:5]

    train(nn.Linear(8, 8), lambda net, x: (net(x) - x).pow(2).mean(), _batches(), cfg, tmp_path)
    lines = log.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 11))
    assert lines[:5] == first_run  # the records up to the checkpoint are kept as they were
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_training_settles_mkl_vml_before_its_first_step(tmp_path, monkeypatch):
    # As a Pipeline does: a fresh process's first multi-threaded sin/exp could take a low-accuracy kernel.
    import bonsai.train.loop as loop

    order = []
    monkeypatch.setattr(loop, "settle_vml", lambda: order.append("settle"))
    cfg = TrainConfig(steps=2, lr=1e-2, warmup=1, log_every=1, checkpoint_every=100, compile=False)
    train(nn.Linear(8, 8), lambda net, x: order.append("step") or (net(x) - x).pow(2).mean(), _batches(), cfg, tmp_path)
    assert order == ["settle", "step", "step"]
