"""How the last stage turns a position's logits into the next token id.

Greedy (argmax) when ``temperature`` is 0; otherwise the logits are divided by
the temperature, cut to the ``top_k`` most likely tokens and to the nucleus
whose probability reaches ``top_p`` (as Hugging Face's TopK and TopP warpers:
the most likely token always stays), and one token is drawn.

Seeding: every sequence has its own ``torch.Generator``, seeded from
``(seed, k)`` where k is the sequence's index in the batch
(``sequence_seed``).  A sequence's draws therefore depend only on its seed,
its index and its own logits -- not on how the batch is cut into
micro-batches or decode groups, nor on the plan -- so the same seed gives the
same ids run after run, and a sequence's ids do not change when the others
stop early.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """The scenario's ``workload.sampling`` in the form the workers take (picklable)."""

    temperature: float = 0.0
    """0 = greedy; otherwise logits are divided by it before drawing."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p (1: all)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: no limit)."""
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def of(cls, sampling) -> "SamplingConfig":
        """From the scenario's ``Sampling`` (or anything with the same attributes)."""
        return cls(temperature=float(sampling.temperature), top_p=float(sampling.top_p),
                   top_k=int(sampling.top_k), seed=int(sampling.seed))


def sequence_seed(seed: int, k: int) -> int:
    """The generator seed of sequence ``k`` (its index in the batch) under ``seed``."""
    return zlib.crc32(f"hpipe-sampling/{seed}/{k}".encode())


def warp(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """(B, V) logits -> (B, V) float32 logits after temperature, top-k and top-p (cut ones: -inf)."""
    x = logits.float() / cfg.temperature
    if not torch.isfinite(x).all():  # a tiny temperature overflows (or is 0 in float32): its limit,
        # the most likely tokens at 0 and the others at -inf, else the draw saw inf - inf = nan
        top = logits.float().amax(-1, keepdim=True)
        x = torch.zeros_like(x).masked_fill(logits.float() < top, float("-inf"))
    V = x.shape[-1]
    if 0 < cfg.top_k < V:
        kth = torch.topk(x, cfg.top_k, dim=-1).values[:, -1:]  # (B, 1)
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)  # (B, V)
        probs = sorted_x.softmax(-1)
        # drop a token when the tokens more likely than it already reach top_p
        drop = (probs.cumsum(-1) - probs) >= cfg.top_p
        drop[:, 0] = False  # the most likely token always stays
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    return x


class Sampler:
    """Picks next tokens for rows of the batch; one seeded generator per sequence."""

    def __init__(self, cfg: SamplingConfig, batch_size: int):
        self.cfg = cfg
        self.generators = None if cfg.greedy else [
            torch.Generator().manual_seed(sequence_seed(cfg.seed, k)) for k in range(batch_size)]

    def __call__(self, logits: torch.Tensor, rows: Sequence[int]) -> list[int]:
        """Next token id of each row: ``logits`` (b, V) belong to batch sequences ``rows``."""
        if self.cfg.greedy:
            return logits.argmax(-1).tolist()
        probs = warp(logits, self.cfg).softmax(-1).cpu()  # (b, V); draws on the CPU generators
        return [int(torch.multinomial(probs[i], 1, generator=self.generators[k]))
                for i, k in enumerate(rows)]
