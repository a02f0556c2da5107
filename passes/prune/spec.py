"""The pass a ``--prune METHOD:LEVEL`` build option names: ``magnitude:0.5``, ``wanda:0.5``,
``sparsegpt:2:4``, or structured ``flap:0.2`` / ``wanda-sp:0.2`` (``prune-structured`` with that
metric, removing that fraction of the decoder layers' linear parameters). Calibrated methods take
the build's ``--calib`` options."""

from __future__ import annotations

from ...errors import LLMOptError
from .frame import CalibratedPruning, Pruning
from .levels import Level
from .magnitude import PruneMagnitude
from .sparsegpt import PruneSparseGPT
from .structured import PruneStructured
from .wanda import PruneWanda

PRUNE_METHODS: dict[str, type[Pruning]] = {"magnitude": PruneMagnitude, "wanda": PruneWanda,
                                           "sparsegpt": PruneSparseGPT, "flap": PruneStructured,
                                           "wanda-sp": PruneStructured}
STRUCTURED_METRICS = {"flap": "flap", "wanda-sp": "wanda-sp"}  # method -> prune-structured's metric
CALIBRATION_OPTIONS = {"calibration": str, "samples": int, "seq_len": int, "seed": int}


def calibration_options(calibration: tuple[tuple[str, str], ...]) -> dict:
    """Pass options from ``--calib`` (option, value) pairs, typed; an unknown or ill-typed one is a
    user error."""
    options = {}
    for key, value in calibration:
        if key not in CALIBRATION_OPTIONS:
            raise LLMOptError(f"unknown calibration option {key!r}.", f"Known: {', '.join(CALIBRATION_OPTIONS)}.")
        try:
            options[key] = CALIBRATION_OPTIONS[key](value)
        except ValueError:
            raise LLMOptError(f"calibration option {key}={value!r} is not a valid "
                              f"{CALIBRATION_OPTIONS[key].__name__}.", "Fix the --calib value.") from None
    return options


def pruning_pass(spec: str, calibration: tuple[tuple[str, str], ...] = ()) -> Pruning:
    """The pass of ``spec`` (``METHOD:LEVEL``), with ``calibration`` (option, value) pairs for the
    calibrated methods (ignored by ``magnitude``)."""
    method, sep, text = spec.partition(":")
    if not sep or method not in PRUNE_METHODS:
        raise LLMOptError(f"--prune {spec!r} does not name a pruning method.",
                          f"Write --prune METHOD:LEVEL with METHOD one of {', '.join(PRUNE_METHODS)}, "
                          "e.g. wanda:0.5, sparsegpt:2:4 or flap:0.2.")
    level = Level.parse(text, f"--prune {spec}: level")
    cls = PRUNE_METHODS[method]
    if method in STRUCTURED_METRICS and level.is_nm:
        raise LLMOptError(f"--prune {spec}: {method} removes a fraction of the parameters, not N of every M.",
                          f"Write a fraction in [0, 1), e.g. --prune {method}:0.2.")
    options = {"nm": str(level)} if level.is_nm else {"sparsity": level.sparsity}
    if method in STRUCTURED_METRICS:
        options["metric"] = STRUCTURED_METRICS[method]
    if issubclass(cls, CalibratedPruning):
        options.update(calibration_options(calibration))
    return cls(**options)
