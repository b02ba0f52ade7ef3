"""Running align's and TRL's trainers side by side: step end times, first-step losses, the agreement check.

Both sides are timed the same way: the wall-clock time at the end of each optimizer step (align: when the trainer
hands the step's metrics to ``_after_step``; TRL: the ``on_step_end`` callback), so the interval of a step holds its
data loading, collation, forward, backward, optimizer update, and the previous step's logging.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time

LOSS_RTOL = 1e-4  # relative agreement of the first optimizer step's loss, fp32


def run_align(cfg: dict, steps: int, trainer_cls=None) -> tuple[list[tuple[float, float]], object]:
    """A fresh align Trainer on ``cfg`` for ``steps`` optimizer steps: [(time at step end, loss)], the trainer."""
    from align.config import pipeline_from_dict
    from align.trainer import Trainer

    trainer = (trainer_cls or Trainer)(pipeline_from_dict(cfg).stages[0].config)
    trainer.setup()
    marks: list[tuple[float, float]] = []
    after_step = trainer._after_step

    def record(metrics, logger):
        marks.append((time.perf_counter(), metrics["loss"]))
        after_step(metrics, logger)

    trainer._after_step = record
    trainer.fit(max_steps=steps)
    return marks, trainer


def trl_trainer_class(base):
    """``base`` (a TRL trainer class) that records [(time at step end, loss)] in ``self.marks``; with ``sampler`` set
    (a callable dataset → Sampler), that sampler replaces the trainer's shuffling (the order both sides share)."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            trainer = self.trainer
            trainer.marks.append((time.perf_counter(), trainer._bench_loss))
            trainer._bench_loss = 0.0

    class Recorded(base):
        sampler = None

        def __init__(self, *args, **kwargs):
            self.marks: list[tuple[float, float]] = []
            self._bench_loss = 0.0
            marks = Marks()
            marks.trainer = self
            super().__init__(*args, callbacks=[marks], **kwargs)
            self.remove_callback(PrinterCallback)  # the per-step log dict on stdout (disable_tqdm)

        def _get_train_sampler(self, train_dataset=None):
            if self.sampler is None:
                return super()._get_train_sampler(train_dataset)
            return self.sampler(train_dataset if train_dataset is not None else self.train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._bench_loss += float(loss)  # each micro-batch's share of the optimizer-step loss
            return loss

    Recorded.__name__ = base.__name__
    return Recorded


def rate(marks: list[tuple[float, float]], amounts: list[float], warmup: int, unit: str) -> dict:
    """Amount per second over the steps after ``warmup`` (``amounts``: per step, e.g. tokens or pairs)."""
    times = [m[0] for m in marks]
    done = sum(amounts[warmup:])
    secs = times[-1] - times[warmup - 1] if warmup else times[-1] - times[0]
    return {"value": done / secs, "seconds": secs, "amount": done, "losses": [m[1] for m in marks],
            "text": f"{done:.0f} {unit} in {secs:.2f} s = {done / secs:.1f} {unit}/s, first loss {marks[0][1]:.6f}"}


def free(*objects) -> None:
    for o in objects:
        del o
    gc.collect()


class AgreementCheck:
    """Wraps each side's run; once both have run, their first-step losses must agree (else the script stops)."""

    def __init__(self, what: str = "first-step loss", rtol: float = LOSS_RTOL):
        self.first: dict[str, float] = {}
        self.what, self.rtol = what, rtol

    def wrap(self, name: str, run):
        def checked():
            res = run()
            self.first.setdefault(name, res["losses"][0])
            if len(self.first) == 2:
                (na, a), (nb, b) = self.first.items()
                if abs(a - b) > self.rtol * max(abs(a), abs(b)):
                    sys.exit(f"{self.what} differs: {na} {a!r}, {nb} {b!r} (relative tolerance {self.rtol}); the two "
                             "sides do not compute the same thing, so their speeds are not comparable")
            return res
        return checked

    def summary(self) -> str:
        (na, a), (nb, b) = self.first.items()
        return f"{self.what}: {na} {a:.6f}, {nb} {b:.6f} (|Δ| {abs(a - b):.1e}, tolerance {self.rtol:g} relative)"


def tmpdir(root: str, prefix: str) -> str:
    return tempfile.mkdtemp(dir=root, prefix=prefix)
