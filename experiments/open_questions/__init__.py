"""Open questions about feedback alignment, one experiment each, with fbalign's own rules and measurements.

Experiments (the names ``fbalign reproduce open-questions --only`` takes):

==================  ==============================================================================================
fixed-b             which fixed B is best: uniform / gaussian / orthogonal / sparse / sign(W0) / W0, and its scale,
                    on the linear teacher (30-20-10), the nonlinear teacher (30-20-10-10) and Fashion-MNIST
nonlinear-feedback  a nonlinear feedback pathway (tanh, hardtanh, softsign, relu, sign, saturation s) on fa and on
                    backprop: the final NSE / test error against the linear pathway, and the step time ratio
plastic             plastic feedback (kp, wm) against fixed B (fa) and backprop on Fashion-MNIST: learning speed
                    and ∡(B, Wᵀ) per layer over training (Akrout et al. 2019)
depth               BP / FA / DFA / KP with 2 to 8 hidden layers on Fashion-MNIST: test error against depth, and
                    the alignment of the lowest hidden layer's update
==================  ==============================================================================================

One module per question (``fixed_b``, ``nonlinear_feedback``, ``plastic``, ``depth``), each read top to bottom:
its sizes, then run, claims, plot and report; ``shared`` holds what they share. The teacher tasks learn online from
one data stream shared by every condition (float64), with the pieces of :mod:`fbalign.experiments.lillicrap2016`
(``student``, ``train_online``, ``tune_eta``); the image networks train in :func:`fbalign.train.train` (run
directories under the output folder, so ``--resume`` keeps every finished run of an interrupted reproduction), and
angles come from :mod:`fbalign.metrics`. Conditions run side by side in processes by :func:`fbalign.runner.run`.

Learning rates follow one rule everywhere: every condition gets its own rate from a fixed grid, chosen on held-out
data on seed 0's network, and then trains every seed at that rate for the same budget. Teacher tasks: the grid
10^-5 … 1 in half decades, scored by :func:`tune_eta` on a prefix of the stream. Image tasks: ``IMAGE_LR_GRID``
(SGD, momentum 0.9, batch 128), scored by the validation error after ``tune_epochs`` epochs.

Each experiment's sizes are in a table ``<NAME>_SCALE = {"quick": {...}, "full": {...}, "tiny": {...}}`` picked
by ``ctx.scale`` (``tiny``: the tests').
"""

from __future__ import annotations

from ..common import Experiment
from ..toolkit import mean_sd, pm
from .depth import DEPTH_SCALE, claims_depth, depth_model, plot_depth, report_depth, run_depth
from .fixed_b import (
    FIXED_B_SCALE,
    FIXED_KINDS,
    claims_fixed_b,
    fixed_b_model,
    plot_fixed_b,
    report_fixed_b,
    run_fixed_b,
)
from .nonlinear_feedback import (
    NONLINEAR_SCALE,
    PATHS,
    SATURATION_SWEEP,
    claims_nonlinear_feedback,
    path_model,
    plot_nonlinear_feedback,
    report_nonlinear_feedback,
    run_nonlinear_feedback,
)
from .plastic import (
    AKROUT_MNIST_ACCURACY,
    MOMENTUM_CONTROLS,
    PLASTIC_RULES,
    PLASTIC_SCALE,
    claims_plastic,
    plastic_model,
    plot_plastic,
    report_plastic,
    run_plastic,
)
from .shared import (
    FEEDBACK,
    IMAGE_BATCH,
    IMAGE_LR_GRID,
    IMAGE_MOMENTUM,
    JOBS,
    KP_DECAY,
    LILLICRAP_RMS,
    MIRROR_BATCH,
    MIRROR_LR,
    PLASTIC_LR_GRID,
    PLASTIC_MOMENTUM,
    TEACHER_ETA_GRID,
    arriving_error_rms,
    fixed_feedback,
    fixed_feedback_model,
    hidden_layers,
    image_condition,
    image_data,
    image_student,
    mirror_after_every_step,
    run_condition,
    run_conditions,
    sizes,
    student,
    teacher_condition,
    teacher_student,
    teacher_task,
    train_image,
)

__all__ = ["TITLE", "INTRODUCTION", "EXPERIMENTS", "Experiment", "DEPTH_SCALE", "claims_depth", "depth_model",
           "plot_depth", "report_depth", "run_depth", "FIXED_B_SCALE", "FIXED_KINDS", "claims_fixed_b",
           "fixed_b_model", "plot_fixed_b", "report_fixed_b", "run_fixed_b", "NONLINEAR_SCALE", "PATHS",
           "SATURATION_SWEEP", "claims_nonlinear_feedback", "path_model", "plot_nonlinear_feedback",
           "report_nonlinear_feedback", "run_nonlinear_feedback", "AKROUT_MNIST_ACCURACY", "MOMENTUM_CONTROLS",
           "PLASTIC_RULES", "PLASTIC_SCALE", "claims_plastic", "plastic_model", "plot_plastic", "report_plastic",
           "run_plastic", "FEEDBACK", "IMAGE_BATCH", "IMAGE_LR_GRID", "IMAGE_MOMENTUM", "JOBS", "KP_DECAY",
           "LILLICRAP_RMS", "MIRROR_BATCH", "MIRROR_LR", "PLASTIC_LR_GRID", "PLASTIC_MOMENTUM", "TEACHER_ETA_GRID",
           "arriving_error_rms", "fixed_feedback", "fixed_feedback_model", "hidden_layers", "image_condition",
           "image_data", "image_student", "mean_sd", "mirror_after_every_step", "pm", "run_condition",
           "run_conditions", "sizes", "teacher_condition", "teacher_student", "teacher_task", "train_image",
           "student"]

TITLE = "Open questions about feedback alignment: which fixed B, a nonlinear feedback path, plastic feedback, depth"

INTRODUCTION = (
    "Four questions that the feedback-alignment literature leaves open, each answered by one experiment run with "
    "fbalign's rules, its alignment metrics and its training loop. Every condition gets the same training budget "
    "and its own learning rate, chosen from a fixed grid on held-out data by one rule (see each section); every "
    "number is a mean ± standard deviation over independent seeds (new weights and new B each). The literature's "
    "claims are set beside ours where the anchored papers make one; they were measured on other data (MNIST where "
    "we use Fashion-MNIST), so the comparison is of the direction and size of effects, not of the numbers. The "
    "rates are chosen on short runs (quick mode: one epoch, or a fifth of a teacher stream), so a condition whose "
    "best rate differs over a longer run can rank lower than it would with its best rate; each table gives the "
    "rate chosen and flags rates at the grid's edge.")

# Its experiments train their conditions in worker processes (fbalign.runner): reproduce runs them one at a time.
TRAINS_IN_PROCESSES = True

EXPERIMENTS = [
    Experiment("fixed-b", "Which fixed B is best, and at what scale?", run_fixed_b, report_fixed_b, threads=1,
               claims=claims_fixed_b, plot=plot_fixed_b),
    Experiment("nonlinear-feedback", "Does a nonlinear feedback pathway still learn, and at what cost?",
               run_nonlinear_feedback, report_nonlinear_feedback, threads=1, claims=claims_nonlinear_feedback,
               plot=plot_nonlinear_feedback),
    Experiment("plastic", "Does plastic feedback (KP, WM) learn faster than a fixed B?", run_plastic,
               report_plastic, threads=1, claims=claims_plastic, plot=plot_plastic),
    Experiment("depth", "Does FA keep up as depth grows, and where does DFA stand?", run_depth, report_depth,
               threads=1, claims=claims_depth, plot=plot_depth),
]
