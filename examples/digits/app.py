"""Classify 8x8 handwritten digits with a nearest-neighbors model shipped as model.npz.

The module-level code is the init phase and runs once per instance: it reads the
training images that train.py saved and fits a scikit-learn KNeighborsClassifier on
them. An event is `{"images": [[64 pixels from 0 to 16], ...]}`, each image flattened
row by row like `sklearn.datasets.load_digits().data`. The result is
`{"predictions": [digit, ...]}` in the same order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.neighbors import KNeighborsClassifier

import coldbrew

MODEL_PATH = Path(__file__).resolve().parent / "model.npz"
PIXELS_PER_IMAGE = 64
MAX_PIXEL_VALUE = 16


def load_model(path: Path) -> KNeighborsClassifier:
    """Fit a KNeighborsClassifier on the training images in a model.npz written by train.py."""
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found; create it with "
                                "python examples/digits/train.py")
    # allow_pickle=False: the file may contain plain arrays only, never pickled objects.
    with np.load(path, allow_pickle=False) as stored:
        classifier = KNeighborsClassifier(n_neighbors=int(stored["n_neighbors"]))
        train_images = stored["train_images"].astype(np.float64)
        classifier.fit(train_images, stored["train_labels"])
    # The first predict() call took about 10 ms longer than later ones (scikit-learn
    # 1.9.1 on a 2-core machine), so the init phase pays for it, not the first request.
    classifier.predict(train_images[:1])
    return classifier


MODEL = load_model(MODEL_PATH)

app = coldbrew.App("digits")


@app.function(name="digits", memory_mb=256, timeout_s=10, keep_alive_s=300,
              preload=["numpy", "sklearn", "sklearn.neighbors"])
def classify(event: Any, context: Any) -> dict[str, list[int]]:
    images = parse_images(event)
    return {"predictions": [int(label) for label in MODEL.predict(images)]}


def parse_images(event: Any) -> np.ndarray:
    """Convert the event to an array of images; raise ValueError at the first invalid value."""
    if not isinstance(event, dict) or "images" not in event:
        raise ValueError(f"the event must be a JSON object with an 'images' list, got "
                         f"{_preview(event)}")
    images = event["images"]
    if not isinstance(images, list) or not images:
        raise ValueError(f"'images' must be a non-empty list of images, got {_preview(images)}")

    for index, image in enumerate(images):
        if not isinstance(image, list) or len(image) != PIXELS_PER_IMAGE:
            size = f"{len(image)} values" if isinstance(image, list) else _preview(image)
            raise ValueError(f"images[{index}] must be a list of {PIXELS_PER_IMAGE} numbers "
                             f"(an 8x8 image flattened row by row), got {size}")
        for position, pixel in enumerate(image):
            # bool is a subclass of int, and numpy would read the string "3" as 3.0. The
            # range check also rejects NaN and infinity, which Python's json module accepts.
            valid = (isinstance(pixel, (int, float)) and not isinstance(pixel, bool)
                     and 0 <= pixel <= MAX_PIXEL_VALUE)
            if not valid:
                raise ValueError(f"images[{index}][{position}] is {_preview(pixel)}; expected a "
                                 f"number from 0 to {MAX_PIXEL_VALUE}")
    return np.array(images, dtype=np.float64)


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
