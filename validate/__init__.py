"""rdcd.validate: copy-detection evaluation (ISC2021 metrics), runtime runners, the INT8 gate and the
latency bench. The runners (:mod:`rdcd.validate.runtimes`) and the bench never import torch."""
