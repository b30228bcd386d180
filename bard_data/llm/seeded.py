"""Per-request seeded sampling for a batched ``transformers`` ``generate``.

``generate`` draws every row's next token from one global RNG (``torch.multinomial``), so a row's
sample depends on its batch neighbours and on everything sampled before it: a rerun that batches
differently (a resume after a kill, another ``batch_size``) samples differently. Here each row
gets its own ``torch.Generator`` seeded with its request's seed, and the token is picked by the
Gumbel-max trick: ``argmax(logits / T + G)`` with ``G = -log(-log(U))``, ``U`` uniform from the
row's generator, is a draw from ``softmax(logits / T)`` (restricted to the top-k / top-p set).
``generate`` then runs greedily (``do_sample=False``) and its argmax takes that draw.

Every step draws exactly ``vocab`` uniforms per row, so the noise of row ``i`` at step ``t`` is
the ``t``-th block of its own generator's stream, whatever else is in the batch. What this cannot
make batch-independent are the logits themselves (float math over a padded batch); see
``TransformersLLM`` and the README's Runs section for what was measured.

Temperature, top-k and top-p are applied here in the order transformers' own warpers use
(temperature, top-k, top-p); the repetition penalty stays transformers' processor, which runs
before this one.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import LogitsProcessor


class RowSeededSampler(LogitsProcessor):
    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float = 1.0, top_k: int = 0):
        if temperature <= 0:
            raise ValueError("RowSeededSampler samples; use greedy decoding for temperature 0")
        self.generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"RowSeededSampler: {scores.shape[0]} rows, {len(self.generators)} seeds")
        scores = scores.float() / self.temperature
        vocab = scores.shape[-1]
        if 0 < self.top_k < vocab:
            kth = torch.topk(scores, self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            # As transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p,
            # always keeping the most likely token.
            sorted_logits, sorted_idx = torch.sort(scores, descending=False, dim=-1)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove_sorted = cum <= (1 - self.top_p)
            remove_sorted[..., -1:] = False
            remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
            scores = scores.masked_fill(remove, float("-inf"))
        u = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in self.generators])
        tiny = torch.finfo(torch.float64).tiny
        gumbel = -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-16)))
        # float64, so that adding the noise cannot round two candidates into a tie.
        return scores.double() + gumbel.to(scores.device)
