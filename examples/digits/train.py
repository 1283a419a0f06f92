"""Fit the digits model ahead of time and write it to model.npz next to this file.

Run it from the repository root with `python examples/digits/train.py`. It needs
numpy and scikit-learn (`pip install -e '.[examples]'`) and takes about a second.

The model is a k-nearest-neighbors classifier, so its fitted state is the training
images themselves plus k. The last 20% of `load_digits()` is held out: train.py
never shows those rows to the model, and model.npz records where they start so that
callers measure accuracy on exactly those rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import KFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

MODEL_PATH = Path(__file__).resolve().parent / "model.npz"
HELD_OUT_FRACTION = 0.2
CANDIDATE_NEIGHBORS = (1, 3, 5, 7)
CV_FOLDS = 5


def choose_neighbors(images: np.ndarray, labels: np.ndarray) -> int:
    """Pick k by cross-validation on the training rows only, so the held-out rows stay unseen."""
    # Without shuffling, the folds, and so the chosen k, are the same on every run.
    folds = KFold(n_splits=CV_FOLDS)
    scores = {k: cross_val_score(KNeighborsClassifier(n_neighbors=k), images, labels,
                                 cv=folds).mean()
              for k in CANDIDATE_NEIGHBORS}
    for k, score in scores.items():
        print(f"k={k}: cross-validated accuracy {score:.4f}")
    return max(scores, key=lambda k: scores[k])


def main() -> None:
    dataset = load_digits()
    test_start = len(dataset.data) - int(len(dataset.data) * HELD_OUT_FRACTION)
    train_images = dataset.data[:test_start]
    train_labels = dataset.target[:test_start]

    # Pixels are whole numbers from 0 to 16, so uint8 stores them exactly in an eighth
    # of the space that float64 takes.
    stored_images = train_images.astype(np.uint8)
    if not np.array_equal(stored_images, train_images):
        raise ValueError("load_digits() returned pixels that are not whole numbers from 0 to "
                         "16; uint8 storage would change them")

    n_neighbors = choose_neighbors(train_images, train_labels)
    model = KNeighborsClassifier(n_neighbors=n_neighbors).fit(train_images, train_labels)
    held_out = model.score(dataset.data[test_start:], dataset.target[test_start:])
    print(f"chose k={n_neighbors}; accuracy on the {len(dataset.data) - test_start} held-out "
          f"images: {held_out:.4f}")

    np.savez_compressed(
        MODEL_PATH,
        train_images=stored_images,
        train_labels=train_labels.astype(np.uint8),
        n_neighbors=np.int64(n_neighbors),
        test_start=np.int64(test_start),
    )
    print(f"wrote {MODEL_PATH} ({MODEL_PATH.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
