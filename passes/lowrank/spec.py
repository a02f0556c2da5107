"""The pass a ``--lowrank METHOD:RATIO[:ALLOCATION]`` build option names: ``svd:0.2``, ``asvd:0.2``,
``asvd:0.2:energy``. ``asvd`` takes the build's ``--calib`` options."""

from __future__ import annotations

from ...errors import LLMOptError
from ..prune.spec import calibration_options
from .allocation import ALLOCATIONS
from .asvd import LowRankASVD
from .frame import CalibratedLowRank, LowRank
from .svd import LowRankSVD

LOWRANK_METHODS: dict[str, type[LowRank]] = {"svd": LowRankSVD, "asvd": LowRankASVD}
HINT = (f"Write --lowrank METHOD:RATIO[:ALLOCATION] with METHOD one of {', '.join(LOWRANK_METHODS)}, RATIO the "
        f"fraction of parameters to remove in [0, 1) and ALLOCATION one of {', '.join(ALLOCATIONS)}, e.g. asvd:0.2.")


def lowrank_pass(spec: str, calibration: tuple[tuple[str, str], ...] = ()) -> LowRank:
    """The pass of ``spec``, with ``calibration`` (option, value) pairs for ``asvd`` (ignored by ``svd``)."""
    method, _, rest = spec.partition(":")
    text, _, allocation = rest.partition(":")
    if method not in LOWRANK_METHODS or not text:
        raise LLMOptError(f"--lowrank {spec!r} does not name a low-rank method and ratio.", HINT)
    try:
        ratio = float(text)
    except ValueError:
        raise LLMOptError(f"--lowrank {spec!r}: ratio {text!r} is not a number.", HINT) from None
    cls = LOWRANK_METHODS[method]
    options = {"ratio": ratio, "allocation": allocation or "uniform"}
    if issubclass(cls, CalibratedLowRank):
        options.update(calibration_options(calibration))
    return cls(**options)
