"""Deprecated: renamed :mod:`fbalign.metrics.alignment_plot` (``fbalign.plot`` is the ``fbalign plot`` command).

Kept for one release; import :func:`fbalign.metrics.plot_alignment` and :func:`fbalign.metrics.sliding_mean_std`.
"""

import warnings

from .alignment_plot import __all__, plot_alignment, sliding_mean_std  # noqa: F401

warnings.warn("fbalign.metrics.plot is deprecated: it is fbalign.metrics.alignment_plot (or import plot_alignment "
              "from fbalign.metrics)", DeprecationWarning, stacklevel=2)
