"""Classic baseline: PDQ, the perceptual hash used on devices for copy matching (no torch).

A 256-bit PDQ hash becomes a +-1/16 vector, so the inner product equals ``1 - 2 * hamming / 256``
and the same faiss search and ISC metrics apply as for learned descriptors.
"""

from __future__ import annotations

import numpy as np

from rdcd.errors import MissingDependency
from rdcd.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec

#: PDQ downsamples to 64x64 internally after a ~512 px resize; feed it 512 x 512.
PDQ_SPEC = PreprocessSpec(size=512, mean=IMAGENET_MEAN, std=IMAGENET_STD)


class PDQEmbedder:
    name = "PDQ (256-bit hash)"
    dim = 256

    def __init__(self):
        try:
            import pdqhash
        except ImportError:
            raise MissingDependency("pdqhash", "pip install pdqhash") from None
        self._pdq = pdqhash

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = np.empty((len(batch), 256), np.float32)
        for i, img in enumerate(batch):
            bits, _quality = self._pdq.compute(np.ascontiguousarray(img))
            out[i] = (bits.astype(np.float32) * 2.0 - 1.0) / 16.0
        return out
