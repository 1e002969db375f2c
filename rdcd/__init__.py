"""rdcd: small image-copy-detection models, distilled, exported, quantized and validated.

The core package holds what every stage shares: the model definition (:mod:`rdcd.model`,
imports torch), the preprocessing spec (:mod:`rdcd.preprocess`), image reading
(:mod:`rdcd.imageio`), the DISC2021 benchmark layout (:mod:`rdcd.benchmark`) and the export
manifest (:mod:`rdcd.manifest`). Only :mod:`rdcd.model`, :mod:`rdcd.teacher` and the training,
export and quantization stages import torch; the runtime runners and the latency bench do not.
"""

__version__ = "0.1.0"
