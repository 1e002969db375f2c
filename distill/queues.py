"""FIFO feature queues (MoCo keys, RSD teacher features), with the image id of every entry.

Callers enqueue features already gathered from every process (so that every rank holds the same
queue). Ids let the MoCo losses skip keys of the query's own image, which matters when a queue
spans more than an epoch (small data sets); with the paper's data they rarely coincide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FeatureQueue:
    """A ring buffer of ``size`` rows of ``dim`` features; ``filled`` rows (from row 0) are valid."""

    def __init__(self, size: int, dim: int, device="cpu", random_init: bool = False, seed: int = 0):
        if size < 1:
            raise ValueError(f"queue size must be positive, got {size}")
        self.size, self.dim = int(size), int(dim)
        self.feats = torch.zeros(self.size, self.dim, device=device)
        self.ids = torch.full((self.size,), -1, dtype=torch.long, device=device)
        self.ptr = 0
        self.filled = 0
        if random_init:  # MoCo starts from random unit vectors (no image id)
            g = torch.Generator().manual_seed(seed)
            self.feats.copy_(F.normalize(torch.randn(self.size, self.dim, generator=g), dim=1))
            self.filled = self.size

    def __len__(self) -> int:
        return self.filled

    def features(self) -> torch.Tensor:
        return self.feats[: self.filled]

    def item_ids(self) -> torch.Tensor:
        return self.ids[: self.filled]

    @torch.no_grad()
    def enqueue(self, feats: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Write ``feats`` [n, dim] at the pointer, overwriting the oldest rows."""
        feats = feats.detach().to(self.feats.device, self.feats.dtype)
        if ids is None:
            ids = torch.full((len(feats),), -1, dtype=torch.long)
        ids = ids.detach().to(self.ids.device, torch.long)
        if len(feats) > self.size:  # only the newest rows fit
            feats, ids = feats[-self.size:], ids[-self.size:]
        n = len(feats)
        idx = (self.ptr + torch.arange(n, device=self.feats.device)) % self.size
        self.feats[idx] = feats
        self.ids[idx] = ids
        self.ptr = (self.ptr + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def state_dict(self) -> dict:
        return {"feats": self.feats.cpu().clone(), "ids": self.ids.cpu().clone(), "ptr": self.ptr,
                "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["feats"].shape) != (self.size, self.dim):
            raise ValueError(f"queue shape {tuple(state['feats'].shape)} in the checkpoint, expected "
                             f"{(self.size, self.dim)}")
        self.feats.copy_(state["feats"])
        self.ids.copy_(state["ids"])
        self.ptr = int(state["ptr"])
        self.filled = int(state["filled"])
