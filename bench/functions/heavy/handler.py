"""A handler whose module imports numpy and scikit-learn, and torch where it is installed."""

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

try:
    import torch
except ImportError:
    torch = None  # type: ignore[assignment]


def predict(event: dict[str, Any], context: Any) -> dict[str, Any]:
    # Touch each library so that the import is not dead weight the handler never uses.
    model = LogisticRegression()
    return {"mean": float(np.mean(event.get("values", [1.0, 2.0]))),
            "model": type(model).__name__, "torch": torch is not None}
