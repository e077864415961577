"""Toxic-caption classifier: alt-profanity-check, offline.

Its linear SVM and vectorizer ship inside the pip package (loaded by the
package itself from its installed files; nothing is downloaded), and it
scores thousands of captions per second on a CPU, so each client flags its
own captions on-device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

THRESHOLD = 0.5  # the package's own predict() cut-off


def toxicity_scores(texts: Sequence[str]) -> np.ndarray:
    """Probability that each text is offensive."""
    if not len(texts):
        return np.zeros(0)
    from profanity_check import predict_prob  # imported on use: it loads its model at import

    return np.asarray(predict_prob(list(texts)), dtype=float)


def flag_toxic(texts: Sequence[str], threshold: float = THRESHOLD) -> np.ndarray:
    """Boolean flag per text: offensive by the classifier."""
    return toxicity_scores(texts) >= threshold
