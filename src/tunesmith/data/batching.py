"""Micro-batches: length-grouped order, padding-free packing, shared prompts and collation.

Every batch carries `seq_ids` (which sequence each token's label belongs to, -1 for padding), `attn_ids`
(attention groups) and restarting `position_ids`. Attention is always given as an explicit 4D causal mask
built from the groups: SDPA does not keep packed sequences apart from position ids alone, and the same path
then serves padded, packed and prompt-sharing rows. A pair of sequences with the same prompt (a preference
pair's chosen and rejected) can compute that prompt once: both continue from one copy, each in a branch the
other cannot see. Packed, padded and shared layouts of the same examples give the same per-sequence results.
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
    seq_ids: torch.Tensor  # [R, T], the sequence whose labels a token carries, -1 for padding
    n_seqs: int
    sources: list[str]
    extra: dict  # method-specific per-sequence data (e.g. KTO labels)
    attn_ids: torch.Tensor | None = None  # [R, T], attention group (a sequence, or sequences sharing a prompt)
    branch: torch.Tensor | None = None  # [R, T], 0 = seen by the whole group, k > 0 = seen by branch k only
    n_tokens: int | None = None  # tokens of the sequences (a shared prompt counts once per sequence)

    @property
    def n_target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def n_real_tokens(self) -> int:
        """Tokens of the sequences in the batch, as if each were alone (a shared prompt counts for each)."""
        return self.n_tokens if self.n_tokens is not None else int((self.seq_ids >= 0).sum())

    @property
    def n_computed_tokens(self) -> int:
        """Positions the model actually runs (a shared prompt counts once)."""
        return int((self.seq_ids >= 0).sum())

    def attention_mask(self) -> torch.Tensor:
        """[R, 1, T, T] additive float mask (0 = attend, dtype minimum = blocked): token i attends to token j
        iff j <= i, both are in the same attention group, and j is shared by the group or in i's own branch.
        Additive, not boolean, because transformers' eager attention adds the mask to the scores as given;
        SDPA reads both. Padding attends to itself only, so no row of the mask is empty (an empty row makes
        attention return NaN)."""
        g = self.attn_ids if self.attn_ids is not None else self.seq_ids
        t = g.shape[1]
        same = (g[:, :, None] == g[:, None, :]) & (g[:, None, :] >= 0)
        if self.branch is not None:
            key, query = self.branch[:, None, :], self.branch[:, :, None]
            same &= (key == 0) | (key == query)
        causal = torch.ones(t, t, dtype=torch.bool, device=g.device).tril()
        eye = torch.eye(t, dtype=torch.bool, device=g.device)
        allowed = ((same & causal) | eye)[:, None, :, :]
        return torch.zeros(allowed.shape, device=g.device).masked_fill(~allowed, torch.finfo(torch.float32).min)

    def to(self, device: torch.device) -> Batch:
        for name in ("input_ids", "labels", "position_ids", "seq_ids", "attn_ids", "branch"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device, non_blocking=True))
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


def shared_prefix(a: Tokenized, b: Tokenized) -> int:
    """How many leading tokens two sequences can compute once: equal ids, untrained in both, and short of
    the last such token, which each sequence keeps so that its own hidden state predicts its first trained
    token. 0 when nothing can be shared."""
    limit = min(len(a), len(b))
    n = 0
    while n < limit and a.input_ids[n] == b.input_ids[n] and a.labels[n] == IGNORE and b.labels[n] == IGNORE:
        n += 1
    return max(n - 1, 0)


@dataclass
class _Segment:
    seq: int  # sequence index
    start: int  # token range of that sequence
    stop: int
    branch: int  # 0: seen by the whole unit, k > 0: branch k


def _units(seqs: Sequence[Tokenized], share: Sequence[Sequence[int]]) -> list[list[_Segment]]:
    """Each unit is laid out contiguously in one row and forms one attention group: a lone sequence, or the
    shared prompt of a group (a preference pair, a prompt's sampled completions) followed by the rest of each
    sequence as its own branch."""
    paired: dict[int, list[_Segment]] = {}
    for group in share:
        members = list(dict.fromkeys(group))
        if len(members) < 2 or any(i in paired for i in members):
            continue
        first = members[0]
        k = min(shared_prefix(seqs[first], seqs[j]) for j in members[1:])
        if k > 0:
            unit = [_Segment(first, 0, k, 0)]
            unit += [_Segment(j, k, len(seqs[j]), b) for b, j in enumerate(members, start=1)]
            for j in members:
                paired[j] = unit
    units, placed = [], set()
    for i in range(len(seqs)):
        unit = paired.get(i, [_Segment(i, 0, len(seqs[i]), 0)])
        if id(unit) not in placed:
            placed.add(id(unit))
            units.append(unit)
    return units


def collate(seqs: Sequence[Tokenized], pad_id: int, pack_length: int | None = None,
            extra: dict | None = None, share: Sequence[Sequence[int]] = ()) -> Batch:
    """Collate sequences (sequence i gets seq id i). With pack_length, units are packed first-fit decreasing
    into rows of at most pack_length tokens (PACK_TO_LONGEST: the longest unit's length); otherwise one unit
    per row. `share` lists groups of sequences, e.g. pairs (i, j), whose common untrained prefix (the
    shortest `shared_prefix` of the first with each other) is computed once: every sequence of the group then
    attends to that one copy, and each sequence's own tokens continue the prefix's positions in a branch the
    others cannot see — the same math as separate sequences."""
    units = _units(seqs, share)
    lengths = [sum(s.stop - s.start for s in u) for u in units]
    if pack_length == PACK_TO_LONGEST:
        pack_length = max(lengths)
    rows = _pack(lengths, pack_length) if pack_length else [[i] for i in range(len(units))]
    width = max(sum(lengths[u] for u in row) for row in rows)
    r = len(rows)
    input_ids = torch.full((r, width), pad_id, dtype=torch.long)
    labels = torch.full((r, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((r, width), dtype=torch.long)
    seq_ids = torch.full((r, width), -1, dtype=torch.long)
    attn_ids = torch.full((r, width), -1, dtype=torch.long)
    branch = torch.zeros((r, width), dtype=torch.long)
    for ri, row in enumerate(rows):
        at = 0
        for ui in row:
            for seg in units[ui]:
                s, n = seqs[seg.seq], seg.stop - seg.start
                input_ids[ri, at:at + n] = torch.tensor(s.input_ids[seg.start:seg.stop])
                lab = torch.tensor(s.labels[seg.start:seg.stop])
                lab[0] = IGNORE  # a segment's first token is never predicted from the token before it in the row
                labels[ri, at:at + n] = lab
                position_ids[ri, at:at + n] = torch.arange(seg.start, seg.stop)
                seq_ids[ri, at:at + n] = seg.seq
                attn_ids[ri, at:at + n] = ui
                branch[ri, at:at + n] = seg.branch
                at += n
    shared = any(len(u) > 1 for u in units)
    return Batch(input_ids, labels, position_ids, seq_ids, len(seqs),
                 [str(s.source) if s.source else "?" for s in seqs], dict(extra or {}),
                 attn_ids=attn_ids, branch=branch if shared else None, n_tokens=sum(len(s) for s in seqs))


def _pack(lengths: Sequence[int], pack_length: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
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
