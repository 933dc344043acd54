"""The PyTorch reference of the scfm model, as the cross-checks and benchmarks import it.

The network, its heads and losses live in the installable package ``python/scfm_torch``
(``scfm_torch.model``), an independent PyTorch implementation that shares no code with the
Rust model in ``worker/src/model/``; this module puts ``python/`` on ``sys.path`` (so the
tests and ``benches/*.py`` work without installing the package) and re-exports the names
they use. ``ScfmRef`` is the package's ``ScfmModel``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "python"
if str(_PACKAGE_ROOT) not in sys.path:
    sys.path.insert(0, str(_PACKAGE_ROOT))

from scfm_torch.model import (  # noqa: E402
    CLS,
    INIT_STD,
    LN_EPS,
    OFFSET,
    PAD,
    Outputs,
    ScfmConfig,
    adamw_param_groups,
    decays,
    gepc_mse,
    mgem_cross_entropy,
    mgem_mse,
    nt_xent,
    sinusoidal_table,
)
from scfm_torch.model import ScfmModel as ScfmRef  # noqa: E402
from scfm_torch.model import detected_covariate  # noqa: E402

__all__ = [
    "CLS",
    "INIT_STD",
    "LN_EPS",
    "OFFSET",
    "PAD",
    "Outputs",
    "ScfmConfig",
    "ScfmRef",
    "adamw_param_groups",
    "decays",
    "detected_covariate",
    "gepc_mse",
    "mgem_cross_entropy",
    "mgem_mse",
    "nt_xent",
    "sinusoidal_table",
]
