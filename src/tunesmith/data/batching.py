"""Micro-batches: length-grouped order, padding-free packing and collation.

Every batch carries `seq_ids` (which sequence each token belongs to, -1 for padding) and restarting
`position_ids`. Attention is always given as an explicit 4D block-diagonal causal mask built from `seq_ids`:
SDPA does not keep packed sequences apart from position ids alone, and the same path then serves padded
and packed rows. A packed batch and an unpacked batch of the same examples give the same per-sequence results.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .render import IGNORE, Tokenized


@dataclass
class Batch:
    input_ids: torch.Tensor  # [R, T]
    labels: torch.Tensor  # [R, T], IGNORE where not trained
    position_ids: torch.Tensor  # [R, T]
    seq_ids: torch.Tensor  # [R, T], index of the sequence in this batch, -1 for padding
    n_seqs: int
    sources: list[str]
    extra: dict  # method-specific per-sequence data (e.g. KTO labels)

    @property
    def n_target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def n_real_tokens(self) -> int:
        return int((self.seq_ids >= 0).sum())

    def attention_mask(self) -> torch.Tensor:
        """[R, 1, T, T] additive float mask (0 = attend, dtype minimum = blocked): token i attends to token j
        iff same sequence and j <= i. Additive, not boolean, because transformers' eager attention adds the
        mask to the scores as given; SDPA reads both. Padding attends to itself only, so no row of the mask is
        empty (an empty row makes attention return NaN)."""
        s = self.seq_ids
        t = s.shape[1]
        same = (s[:, :, None] == s[:, None, :]) & (s[:, None, :] >= 0)
        causal = torch.ones(t, t, dtype=torch.bool, device=s.device).tril()
        eye = torch.eye(t, dtype=torch.bool, device=s.device)
        allowed = ((same & causal) | eye)[:, None, :, :]
        return torch.zeros(allowed.shape, device=s.device).masked_fill(~allowed, torch.finfo(torch.float32).min)

    def to(self, device: torch.device) -> Batch:
        for name in ("input_ids", "labels", "position_ids", "seq_ids"):
            setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        self.extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.extra.items()}
        return self


PACK_TO_LONGEST = -1  # pack into rows as long as the micro-batch's longest sequence


def pack_setting(packing: bool, pack_length: int | None) -> int | None:
    """What collate gets for train.packing / train.pack_length: None (one sequence per row), a row length, or
    PACK_TO_LONGEST. Rows no longer than the longest sequence keep attention cost (rows x length^2) at what
    padding would cost, while still filling the room short sequences leave."""
    if not packing:
        return None
    return pack_length or PACK_TO_LONGEST


def collate(seqs: Sequence[Tokenized], pad_id: int, pack_length: int | None = None,
            extra: dict | None = None) -> Batch:
    """Collate sequences (sequence i gets seq id i). With pack_length, sequences are packed first-fit
    decreasing into rows of at most pack_length tokens (PACK_TO_LONGEST: the longest sequence's length);
    otherwise one sequence per row."""
    if pack_length == PACK_TO_LONGEST:
        pack_length = max(len(s) for s in seqs)
    rows = _pack(seqs, pack_length) if pack_length else [[i] for i in range(len(seqs))]
    width = max(sum(len(seqs[i]) for i in row) for row in rows)
    r = len(rows)
    input_ids = torch.full((r, width), pad_id, dtype=torch.long)
    labels = torch.full((r, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((r, width), dtype=torch.long)
    seq_ids = torch.full((r, width), -1, dtype=torch.long)
    for ri, row in enumerate(rows):
        at = 0
        for si in row:
            s = seqs[si]
            n = len(s)
            input_ids[ri, at:at + n] = torch.tensor(s.input_ids)
            lab = torch.tensor(s.labels)
            lab[0] = IGNORE  # the first token of a sequence is never predicted from the previous one
            labels[ri, at:at + n] = lab
            position_ids[ri, at:at + n] = torch.arange(n)
            seq_ids[ri, at:at + n] = si
            at += n
    return Batch(input_ids, labels, position_ids, seq_ids, len(seqs),
                 [str(s.source) if s.source else "?" for s in seqs], dict(extra or {}))


def _pack(seqs: Sequence[Tokenized], pack_length: int) -> list[list[int]]:
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(seqs[i])
        for ri, free in enumerate(room):
            if free >= n:
                rows[ri].append(i)
                room[ri] -= n
                break
        else:
            rows.append([i])
            room.append(max(pack_length, n) - n)
    for row in rows:
        row.sort()
    return rows


def batch_order(lengths: Sequence[int], micro_batch_size: int, seed: int, epoch: int,
                group_by_length: bool = True, megabatch: int = 64) -> list[list[int]]:
    """Example indices for each micro-batch of one epoch, seeded by (seed, epoch). With group_by_length,
    examples are shuffled, cut into mega-batches, sorted by length inside each, and the resulting micro-batches
    shuffled, so similar lengths share a micro-batch while the order stays random."""
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if group_by_length:
        size = micro_batch_size * megabatch
        idx = [i for k in range(0, len(idx), size)
               for i in sorted(idx[k:k + size], key=lambda j: -lengths[j])]
    batches = [idx[k:k + micro_batch_size] for k in range(0, len(idx), micro_batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches
