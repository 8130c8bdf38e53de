"""fbalign: train PyTorch networks with asymmetric feedback (feedback alignment, sign symmetry and kin).

    >>> import fbalign
    >>> model = fbalign.convert(my_model, "fa", seed=0)   # every Linear/Conv now sends its error through B
    >>> print(fbalign.summary(model))
"""

from . import attention, dfa, functional, metrics, nn, optim, perturbation, plastic, recurrent, rules
from .convert import UnconvertedModuleWarning, convert, summary, unconverted
from .dfa_points import dfa_points
from .nn import exact_backprop, feedback_layers
from .perturbation import NodePerturbation
from .plastic import mirror
from .rules import FeedbackRule

__version__ = "0.1.0"

__all__ = ["convert", "summary", "unconverted", "UnconvertedModuleWarning", "FeedbackRule", "rules", "nn",
           "functional", "metrics", "optim", "dfa", "plastic", "mirror", "perturbation", "NodePerturbation",
           "exact_backprop", "feedback_layers", "__version__",
           "attention", "recurrent", "dfa_points"]
