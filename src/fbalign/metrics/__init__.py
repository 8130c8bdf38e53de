"""Alignment instrumentation: how a feedback rule's updates line up with backprop's, per layer, while training.

* :func:`measure_alignment` — one batch: ∡(Δh, Δh_BP), ∡(Δh, Δh_PBP), ∡(B, Wᵀ), ‖B‖/‖W‖, the fraction of
  examples with eᵀWBe > 0, the angle of every parameter's gradient to backprop's, the loss and NSE.
* :func:`measure_step` — the same on a training step's own forward/backward (one extra pass instead of two).
* :class:`AlignmentRecorder` — the same every N training steps, appended to a JSONL/CSV file (and TensorBoard).
* :func:`plot_alignment` — angle against step per layer, with its spread over a sliding window.
* :func:`angle`, :func:`example_angles`, :func:`nse` — the underlying quantities.

The keys and their definitions are listed in :mod:`fbalign.metrics.alignment`.
"""

from .alignment import angle, example_angles, measure_alignment, measure_step, nse
from .alignment_plot import plot_alignment, sliding_mean_std
from .recorder import AlignmentRecorder, load_records

__all__ = ["measure_alignment", "measure_step", "AlignmentRecorder", "load_records", "plot_alignment",
           "sliding_mean_std", "angle", "example_angles", "nse"]


def __getattr__(name: str) -> object:
    if name == "plot":  # the deprecated module name, imported (with its warning) only when asked for
        import importlib

        return importlib.import_module(".plot", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
