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

RTOL = 1e-4  # relative agreement of the first optimizer step's loss and gradient norm, fp32


def run_align(cfg: dict, steps: int, trainer_cls=None, on_setup=None) -> tuple[list[dict], object]:
    """A fresh align Trainer on ``cfg`` for ``steps`` optimizer steps: one mark per step ({time at the step's end,
    loss, grad_norm, metrics}) and the trainer. ``on_setup(trainer)`` runs after set-up, before the first step."""
    from align.config import pipeline_from_dict
    from align.trainer import Trainer

    trainer = (trainer_cls or Trainer)(pipeline_from_dict(cfg).stages[0].config)
    trainer.setup()
    if on_setup is not None:
        on_setup(trainer)
    marks: list[dict] = []
    after_step = trainer._after_step

    def record(metrics, logger):
        marks.append({"time": time.perf_counter(), "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                      "metrics": dict(metrics)})
        after_step(metrics, logger)

    trainer._after_step = record
    trainer.fit(max_steps=steps)
    return marks, trainer


def trl_trainer_class(base):
    """``base`` (a TRL trainer class) that records one mark per optimizer step in ``self.marks`` ({time at the step's
    end, loss, grad_norm before clipping, and what ``self.step_extras()`` returns}); with ``sampler`` set
    (a callable dataset → Sampler), that sampler replaces the trainer's shuffling (the order both sides share)."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            trainer = self.trainer
            trainer.marks.append({"time": time.perf_counter(), "loss": trainer._bench_loss,
                                  "grad_norm": trainer._bench_norm, **getattr(trainer, "step_extras", dict)()})
            trainer._bench_loss = 0.0

    class Recorded(base):
        sampler = None

        def __init__(self, *args, **kwargs):
            self.marks: list[dict] = []
            self._bench_loss, self._bench_norm = 0.0, float("nan")
            marks = Marks()
            marks.trainer = self
            super().__init__(*args, callbacks=[marks], **kwargs)
            self.remove_callback(PrinterCallback)  # the per-step log dict on stdout (disable_tqdm)

        def _get_train_sampler(self, train_dataset=None):
            if self.sampler is None:
                return super()._get_train_sampler(train_dataset)
            return self.sampler(train_dataset if train_dataset is not None else self.train_dataset)

        def _clip_grad_norm(self, model):
            norm = super()._clip_grad_norm(model)
            self._bench_norm = float(norm)
            return norm

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._bench_loss += float(loss)  # each micro-batch's share of the optimizer-step loss
            return loss

    Recorded.__name__ = base.__name__
    return Recorded


def rate(marks: list[dict], amounts: list[float], warmup: int, unit: str) -> dict:
    """Amount per second over the steps after ``warmup`` (``amounts``: per step, e.g. tokens or pairs)."""
    times = [m["time"] for m in marks]
    done = sum(amounts[warmup:])
    secs = times[-1] - times[warmup - 1] if warmup else times[-1] - times[0]
    return {"value": done / secs, "seconds": secs, "amount": done, "losses": [m["loss"] for m in marks],
            "grad_norms": [m["grad_norm"] for m in marks],
            "text": f"{done:.0f} {unit} in {secs:.2f} s = {done / secs:.3g} {unit}/s, first loss {marks[0]['loss']:.6f}"}


def free(*objects) -> None:
    for o in objects:
        del o
    gc.collect()


class AgreementCheck:
    """Wraps each side's run; once both have run, their first optimizer step's loss and gradient norm must agree
    (relative ``rtol``; the loss also within ``loss_atol``, for losses that are 0 up to rounding at the first step,
    as GRPO's), else the script stops: the two sides would not be computing the same thing."""

    def __init__(self, rtol: float = RTOL, loss_atol: float = 0.0):
        self.first: dict[str, tuple[float, float]] = {}
        self.rtol, self.loss_atol = rtol, loss_atol

    def wrap(self, name: str, run):
        def checked():
            res = run()
            self.first.setdefault(name, (res["losses"][0], res["grad_norms"][0]))
            if len(self.first) == 2:
                (na, a), (nb, b) = self.first.items()
                for what, x, y, atol in (("first-step loss", a[0], b[0], self.loss_atol),
                                         ("first-step gradient norm", a[1], b[1], 0.0)):
                    if not abs(x - y) <= self.rtol * max(abs(x), abs(y)) + atol:
                        sys.exit(f"{what} differs: {na} {x!r}, {nb} {y!r} (relative tolerance {self.rtol}); the two "
                                 "sides do not compute the same thing, so their speeds are not comparable")
            return res
        return checked

    def summary(self) -> str:
        (na, a), (nb, b) = self.first.items()
        atol = f" + {self.loss_atol:g} absolute for the loss" if self.loss_atol else ""
        return (f"first step: loss {na} {a[0]:.6g} / {nb} {b[0]:.6g}, gradient norm {na} {a[1]:.6f} / {nb} {b[1]:.6f} "
                f"(agree to {self.rtol:g} relative{atol})")


def tmpdir(root: str, prefix: str) -> str:
    return tempfile.mkdtemp(dir=root, prefix=prefix)


def run_sides(args, align_side, trl_side, check: AgreementCheck | None = None) -> tuple[AgreementCheck, dict]:
    """Both sides, agreement-checked on their first runs, alternated ``args.repeats`` times once the load allows
    (``--max-load``). ``trl_side(first)`` gets ``first=True`` on its first run only (for checks of TRL's dataset).
    Returns (the check, {side: [result, ...]})."""
    from benchmarks.common import alternate, wait_quiet

    check = check or AgreementCheck()
    first = [True]

    def trl():
        return trl_side(bool(first and first.pop()))

    sides = {"align": check.wrap("align", align_side), "TRL": check.wrap("TRL", trl)}
    load = wait_quiet(args.max_load)
    print(f"load average {load:.2f}; running {args.repeats} alternating runs per side", flush=True)
    return check, alternate(sides, args.repeats)


def runs_text(results: dict, digits: int) -> str:
    """'align 251 / 248 / 260; TRL 91 / 90 / 93': every run's figure, per side."""
    return "; ".join(f"{k} " + " / ".join(f"{r['value']:.{digits}f}" for r in v) for k, v in results.items())
