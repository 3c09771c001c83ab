"""The shared training loop: Ctrl+C finishes the step, checkpoints it, then stops; the run resumes there."""

from __future__ import annotations

import signal

import pytest
import torch
from torch import nn

from bonsai.train.loop import TrainConfig, train


def _batches():
    gen = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(4, 8, generator=gen)


def test_ctrl_c_checkpoints_the_finished_step_and_the_run_resumes_there(tmp_path, capsys):
    calls = [0]

    def loss_fn(net, x):  # Ctrl+C arrives in the middle of the third step's forward
        calls[0] += 1
        if calls[0] == 3:
            signal.raise_signal(signal.SIGINT)
        return (net(x) - x).pow(2).mean()

    cfg = TrainConfig(steps=10, lr=1e-2, warmup=1, log_every=1, checkpoint_every=100, compile=False)
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    with pytest.raises(KeyboardInterrupt):
        train(model, loss_fn, _batches(), cfg, tmp_path)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    assert saved["step"] == 3  # the interrupted step was finished, not lost with the two before it
    torch.testing.assert_close(saved["model"]["weight"], model.weight.detach(), rtol=0, atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    resumed = train(nn.Linear(8, 8), lambda net, x: (net(x) - x).pow(2).mean(), _batches(), cfg, tmp_path)
    assert resumed.step == 10 and "at step 3" in capsys.readouterr().out
