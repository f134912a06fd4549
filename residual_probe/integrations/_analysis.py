"""The analysis functions the integrations and `plot` use, found where the package keeps them.

The analysis package is being restructured (one first/last ratio, the verdicts in
`analysis/`); this bridge imports the new homes and falls back to the old ones, so that the
integrations never hold a second copy of a computation. Remove it once both are on main.
"""

from __future__ import annotations

try:  # after the restructure
    from ..analysis.collapse import collapse_verdict
    from ..analysis.gradients import decay_verdict
    from ..analysis.summary import first_over_last
    from ..errors import UserError
    from ..output import prepare_out, write_json
except ImportError:  # before it
    from ..analysis.fits import verdict as decay_verdict  # noqa: F401
    from ..jobs.collapse import verdict as collapse_verdict  # noqa: F401
    from ..results import prepare_out, write_json  # noqa: F401

    UserError = ValueError

    def first_over_last(norms) -> float:  # the old home had it only inside DecayFit; same formula
        import numpy as np

        a = np.atleast_2d(np.asarray(norms, dtype=np.float64))
        return float(np.exp(np.mean(np.log(a[:, 0] / a[:, -1]))))

from ..analysis.fits import FitError, geometric_decay  # noqa: E402,F401

__all__ = ["FitError", "UserError", "collapse_verdict", "decay_verdict", "first_over_last", "geometric_decay",
           "prepare_out", "write_json"]
