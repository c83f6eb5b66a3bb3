"""Progress of long computations: bars where a user watches a terminal, messages in the logs.

The bars are tqdm's: standard error is replaced by a stream that says it is a terminal (tqdm
shows nothing on a non-terminal), and the delay before a bar appears is set to 0.
"""

from __future__ import annotations

import io
import logging
import sys

import pytest
from helpers.callback import Module, loader, quiet_trainer, tiny_net

from lightning_spectral import SpectralBoundRegularizer, _progress
from lightning_spectral.report import main as report_main


class Terminal(io.StringIO):
    """A text stream that reports being a terminal, as a user's stderr does."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def messages(caplog: pytest.LogCaptureFixture):
    """Lightning's INFO messages (its logger does not propagate once it has its handler)."""
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        yield caplog
    logger.removeHandler(caplog.handler)


def to_terminal(monkeypatch: pytest.MonkeyPatch) -> Terminal:
    """Standard error to a terminal, no delay. Called in the test body: pytest's capture
    puts its own ``sys.stderr`` back between fixtures and the test."""
    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(_progress, "DELAY_S", 0.0)
    return stream


def test_bar_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = to_terminal(monkeypatch)
    assert list(_progress.progress(range(3), total=3, desc="counting")) == [0, 1, 2]
    assert "counting:   0%" in terminal.getvalue()
    plain = io.StringIO()  # not a terminal: a log file, CI, pytest's capture
    monkeypatch.setattr(sys, "stderr", plain)
    assert list(_progress.progress(range(3), total=3, desc="counting")) == [0, 1, 2]
    assert plain.getvalue() == ""


class Tested(Module):
    """The helpers' module, with a test step (the validation step)."""

    test_step = Module.validation_step


def _validate(enable_progress_bar: bool) -> None:
    reg = SpectralBoundRegularizer(exact_every_n_epochs=1, certify_epsilons=[0.1])
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2,
                            callbacks=[reg], enable_progress_bar=enable_progress_bar)
    trainer.fit(Tested(tiny_net()), loader(16), loader(16))
    trainer.test(trainer.lightning_module, loader(16, n=48), verbose=False)


@pytest.mark.parametrize("enabled", [True, False])
def test_validation_bars_follow_the_trainer(monkeypatch: pytest.MonkeyPatch, messages,
                                            enabled: bool) -> None:
    terminal = to_terminal(monkeypatch)
    _validate(enabled)
    err = terminal.getvalue()
    # Lightning's own bars write to stdout; on stderr are only the callback's.
    assert ("exact norms" in err) is enabled
    assert ("guaranteed bounds" in err) is enabled
    # Messages do not depend on bars: what is computed is said in the logs either way.
    text = messages.text
    assert "computing exact spectral norms of 4 layers at their input sizes" in text
    assert "certifying 48 test points at l2 radii [0.1]" in text
    assert "Lipschitz bound for certification at input shape (1, 8, 8)" in text


def test_no_bar_off_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(_progress, "DELAY_S", 0.0)
    _validate(True)
    assert "exact norms" not in capsys.readouterr().err


def test_report_says_what_it_does(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                  caplog: pytest.LogCaptureFixture) -> None:
    terminal = to_terminal(monkeypatch)
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,spectral_bound/max,spectral_bound/a\n0,1,2.0,2.0\n1,3,1.5,1.5\n")
    with caplog.at_level(logging.INFO, logger="lightning_spectral.report"):
        assert report_main([str(log)]) == 0
    assert f"reading the logs at {log}" in caplog.text
    assert "drawing up to" in caplog.text
    assert "figures" in terminal.getvalue()  # the bar
