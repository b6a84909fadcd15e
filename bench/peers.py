"""The peer libraries the benchmarks compare against, loaded from ``bench/.peers``.

``make bench-deps`` installs them there with ``pip install --no-deps --target bench/.peers
steering-vectors==0.12.2 repeng==0.4.0``: both pin versions this project has moved past
(``transformers<5``, ``numpy<2``) for no reason that matters to what is measured here, and the
``steering-vectors`` distribution's top-level package is called ``steering_vectors``, like ours.
:func:`peer_steering_vectors` therefore imports it under the name ``peer_steering_vectors`` (its
modules import each other by absolute name at import time, so they are imported under their own name
with our package set aside, then renamed in ``sys.modules``).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["PEERS_DIR", "peer_repeng", "peer_steering_vectors"]

PEERS_DIR = Path(__file__).resolve().parent / ".peers"


def _check() -> None:
    if not (PEERS_DIR / "steering_vectors").is_dir() or not (PEERS_DIR / "repeng").is_dir():
        raise RuntimeError(f"peer libraries missing under {PEERS_DIR}: run `make bench-deps` first")


def peer_steering_vectors() -> ModuleType:
    """The ``steering-vectors`` library (PyPI 0.12.2), as module ``peer_steering_vectors``."""
    if "peer_steering_vectors" in sys.modules:
        return sys.modules["peer_steering_vectors"]
    _check()
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "steering_vectors"}
    sys.path.insert(0, str(PEERS_DIR))
    try:
        importlib.import_module("steering_vectors")
        theirs = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "steering_vectors"}
    finally:
        sys.path.remove(str(PEERS_DIR))
        sys.modules.update(ours)
    for name, mod in theirs.items():
        sys.modules["peer_" + name] = mod
    return theirs["steering_vectors"]


def peer_repeng() -> ModuleType:
    """The ``repeng`` library (PyPI 0.4.0).

    Its ``ControlVector`` class names ``np.float_`` in an annotation, which numpy 2 removed; the alias
    is restored (to ``np.float64``, what it always meant) before the import.
    """
    import numpy as np

    _check()
    if "float_" not in np.__dict__:
        np.float_ = np.float64
    if str(PEERS_DIR) not in sys.path:
        sys.path.append(str(PEERS_DIR))
    return importlib.import_module("repeng")
