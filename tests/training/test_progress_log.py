"""A run off a terminal is not silent: a line per validation and a heartbeat, in stdout and in train.log."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest

from pipeline import TINY, run_entry


@pytest.mark.slow
def test_piped_run_prints_validation_and_heartbeat_lines_to_stdout_and_train_log(tmp_path):
    """stdout is a pipe here (not a terminal): the rich bar draws nothing, the progress lines are the run's log."""
    run_dir = tmp_path / "run"
    proc = run_entry("train.py", *TINY, "trainer.max_steps=6", "trainer.val_check_interval=3",
                     "callbacks.progress_log.every_n_steps=2", f"hydra.run.dir={run_dir}", log_dir=tmp_path)
    beat = re.compile(r"\] - step (\d+)/6 \| loss \d+\.\d{4} \| lr \d\.\d{3}e[-+]\d\d \| \d+\.\d img/s \| "
                      r"elapsed \S+ \| ETA \S+$")
    val = re.compile(r"\] - val step (\d+)/6 \| mIoU [01]\.\d{4} mAcc [01]\.\d{4} aAcc [01]\.\d{4} \| "
                     r"train loss \d+\.\d{4} \| elapsed \S+ \| ETA \S+$")
    log_text = (run_dir / "train.log").read_text()
    for text in (proc.stdout, log_text):
        lines = text.splitlines()
        assert [int(m[1]) for m in map(beat.search, lines) if m] == [2, 4, 6], text[-3000:]
        assert [int(m[1]) for m in map(val.search, lines) if m] == [3, 6], text[-3000:]


# ----------------------------------------------------------------------------------------------- units
def _trainer(bar=None, rank_zero=True, step=10, metrics=None, fn="fit"):
    return SimpleNamespace(progress_bar_callback=bar, is_global_zero=rank_zero, global_step=step, world_size=1,
                           estimated_stepping_batches=100, accumulate_grad_batches=1, optimizers=[],
                           sanity_checking=False, state=SimpleNamespace(fn=fn), callback_metrics=metrics or {})


def test_heartbeat_only_where_no_live_bar_is_drawn():
    """``auto``: the rich bar draws live only on a terminal; there the heartbeat would repeat it. ``always``,
    ``never`` and ``every_n_steps=0`` as they say."""
    from lightning.pytorch.callbacks import RichProgressBar

    from setr.training.progress import ProgressLog

    cases = [
        (ProgressLog(), RichProgressBar(console_kwargs={"force_terminal": True}), False),
        (ProgressLog(), RichProgressBar(console_kwargs={"force_terminal": False}), True),
        (ProgressLog(), None, True),
        (ProgressLog(heartbeat="always"), RichProgressBar(console_kwargs={"force_terminal": True}), True),
        (ProgressLog(heartbeat="never"), None, False),
        (ProgressLog(every_n_steps=0), None, False),
    ]
    for cb, bar, beats in cases:
        cb.on_train_start(_trainer(bar), None)
        assert cb._beat is beats, (cb.heartbeat, cb.every_n_steps, bar)


def test_validation_line_on_rank_zero_only_and_never_for_the_sanity_check(caplog):
    import torch

    from setr.training.progress import ProgressLog

    metrics = {"val/mIoU": torch.tensor(0.5), "val/mAcc": torch.tensor(0.6), "val/aAcc": torch.tensor(0.9),
               "train/loss": torch.tensor(1.25)}
    cb = ProgressLog()
    cb.on_train_start(_trainer(step=0), None)
    with caplog.at_level(logging.INFO, logger="setr"):
        cb.on_validation_end(_trainer(rank_zero=False, metrics=metrics), None)
        sanity = _trainer(metrics=metrics)
        sanity.sanity_checking = True
        cb.on_validation_end(sanity, None)
        cb.on_validation_end(_trainer(metrics=metrics, fn="validate"), None)
        assert caplog.messages == []
        cb.on_validation_end(_trainer(metrics=metrics), None)
    assert len(caplog.messages) == 1
    assert caplog.messages[0].startswith("val step 10/100 | mIoU 0.5000 mAcc 0.6000 aAcc 0.9000 | train loss 1.2500 | "
                                         "elapsed ")


def test_bad_options_name_their_key():
    from setr.errors import SETRConfigError
    from setr.training.progress import ProgressLog

    with pytest.raises(SETRConfigError, match=r"^every_n_steps: expected an int >= 0 or null, got -5$"):
        ProgressLog(every_n_steps=-5)
    with pytest.raises(SETRConfigError, match=r"^heartbeat: expected one of auto, always, never, got 'yes'$"):
        ProgressLog(heartbeat="yes")


def test_durations_read_at_a_glance():
    from setr.training.progress import format_duration

    assert [format_duration(s) for s in (0, 42.4, 185, 7620, 97200, float("nan"))] == [
        "0s", "42s", "3m05s", "2h07m", "1d03h", "?"]
