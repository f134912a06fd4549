"""attn_logits: per block, the largest attention logit and the attention entropy.

The precursors of attention-entropy collapse (Zhai et al. 2023, arXiv 2303.06296) and of the
attention-logit growth that Wortsman et al. 2023 (arXiv 2309.14322) reproduce at small scale
with a high learning rate, and that QK-norm (`ModelConfig(qk_norm=True)`) prevents. Per block,
over the training forwards of a recorded step (micro-batches pooled, and across data-parallel
ranks; rows stack/layer as the block's, sublayer "block", stream "-"):

- `attn_logit_max`   the largest logit the softmax receives, softcap(q.k * scaling) + bias, with
                     whatever the model applies before (RoPE, QK-norm) and the additive mask's
                     finite part (ALiBi, position bias); masked positions excluded. scaling is
                     the model's own (1/sqrt(head_dim) by default).
- `attn_entropy`     the mean attention entropy, nats, over heads and query positions: per query
                     row H = -sum_j p_j log p_j of its softmax p (before attention dropout).
                     Uniform causal attention over T keys averages (1/T) sum_i log i.
- `attn_entropy_min` the smallest head's mean entropy (over its query positions): one head
                     that collapses shows here while the block mean hides it.

A block with several attention modules (an encoder-decoder's decoder: self and cross) pools them
in its "block" rows and has rows per module too (sublayer = the module's path in the block). A
query row with no key to attend (a fully padded query) is left out. Queries: every position up to
QUERY_LIMIT per sequence; a longer sequence takes a seeded subsample of QUERY_LIMIT positions
(the same in every sequence of the batch; seed, step and attention module set the draw), and
every key. Logits are computed in float32 (float64 for float64 models) from the q and k the
attention receives, in chunks of query rows of at most CHUNK_BYTES; grouped-query kv heads are
repeated. Under tensor parallelism with heads sharded (q, k DTensors on dim 1) each rank adds
its own heads at their global index, so the entropy of each head is exact after the pooling.

Where q and k come from: `attention_sources.py`. A block whose attention the probe cannot see
(no known attention module inside, an attention implementation other than eager or sdpa, a
forward that bypasses the hook) gets one note naming the block class and no rows: a block whose
attention ran unseen during a recorded step has no rows for that step, never a partial number.

Cost: on recorded steps only, about twenty kernels per attention module (the logits, a masked
max, a logsumexp and the entropy's sums), and the (B, H, chunk, S) logits in memory; between
recorded steps one attribute test or dictionary lookup per attention call.
"""

from __future__ import annotations

import math

import torch

from .attention_sources import Scores, attention_modules, watch
from .base import Quantity, buffer_dtype, row

QUERY_LIMIT = (
    1024  # query positions per sequence taken whole; more: a seeded subsample of this many
)
CHUNK_BYTES = 32 << 20  # the logits of at most this many bytes at once
METRICS = ("attn_logit_max", "attn_entropy", "attn_entropy_min")


def attention_stats(
    s: Scores, positions: torch.Tensor | None = None, masks: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
    """(largest logit, per-head sum of row entropies (H,), query rows per head: (H,) or, where
    every row has a key to attend, their number) of one attention call, in float32 (float64 for
    float64 inputs); the caller runs under no_grad. `positions`: the query positions taken
    (sorted, into q's T), None for all. `masks`: a dict that keeps the causal masks made, by
    shape and device, for the next call (a causal mask costs five kernels to make, and one
    attention call a dozen). Row entropy: -sum_j xlogy(p_j, p_j), 0 log 0 = 0 at masked keys."""
    q, k, mask = s.q, s.k, s.mask
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # not a dispatched op
    B, H, T, D = q.shape
    if k.shape[1] != H:  # grouped-query attention: kv head j serves queries j*g .. j*g + g - 1
        k = k.repeat_interleave(H // k.shape[1], dim=1)
    S = k.shape[2]
    if positions is not None:
        q = q.index_select(2, positions)
        if mask is not None and mask.shape[-2] != 1:
            mask = mask.index_select(-2, positions)
    kt = (k if k.dtype == dtype else k.to(dtype)).transpose(-1, -2)
    scaling = D**-0.5 if s.scaling is None else s.scaling
    n = q.shape[2]
    rows = max(1, CHUNK_BYTES // max(1, B * H * S * kt.element_size()))
    peak = ent_sum = count = None
    for i in range(0, n, rows):
        c = min(rows, n - i)
        qc = q[:, :, i : i + c] if c < n else q
        logits = torch.matmul(qc if qc.dtype == dtype else qc.to(dtype), kt).mul_(scaling)
        if s.softcap:
            logits = logits.div_(s.softcap).tanh_().mul_(s.softcap)
        hidden = None  # True where a key is masked
        if mask is not None:
            m = mask if mask.shape[-2] == 1 else mask[..., i : i + c, :]
            if m.dtype == torch.bool:
                hidden = ~m
            else:
                hidden = m <= torch.finfo(m.dtype).min / 2  # HF's masked entries: the dtype's min
                logits = logits + m.to(dtype)
        if s.causal:
            above = _causal(masks, positions, i, c, S, q.device)
            hidden = above if hidden is None else hidden | above
        if hidden is not None:
            logits = logits.masked_fill_(hidden, -math.inf)
        top = logits.amax()
        p = torch.softmax(logits, -1)
        if mask is None:  # every row has a key (causal: at least itself)
            ent, cnt = torch.special.xlogy(p, p).sum((0, 2, 3)), B * c
        else:  # a row with no key to attend is no attention (its softmax is NaN)
            live = torch.broadcast_to(~hidden.all(-1, keepdim=True), p.shape[:-1] + (1,))
            plogp = torch.special.xlogy(p, p).masked_fill_(~live, 0.0)
            ent, cnt = plogp.sum((0, 2, 3)), live.sum((0, 2, 3)).to(dtype)
        peak = top if peak is None else torch.maximum(peak, top)
        ent_sum = ent if ent_sum is None else ent_sum + ent
        count = cnt if count is None else count + cnt
    return peak, ent_sum.neg_(), count


def _causal(masks, positions, i: int, c: int, S: int, device) -> torch.Tensor:
    """(c, S) True above the diagonal (key after query) for query rows i..i+c (or `positions`)."""
    key = (i, c, S, device) if positions is None else None
    hit = masks.get(key) if masks is not None and key is not None else None
    if hit is not None:
        return hit
    at = torch.arange(i, i + c, device=device) if positions is None else positions[i : i + c]
    above = at[:, None] < torch.arange(S, device=device)[None, :]
    if masks is not None and key is not None:
        if len(masks) >= 16:  # sequences of many lengths: keep the memory bounded
            masks.clear()
        masks[key] = above
    return above


def local_heads(s: Scores) -> tuple[Scores, int, int] | str:
    """(the scores on this rank's tensors, the first head's global index, the global head count);
    a string saying why not where q or k are DTensors sharded other than on the heads."""
    if type(s.q).__name__ != "DTensor" and type(s.k).__name__ != "DTensor":
        return s, 0, s.q.shape[1]
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not (isinstance(s.q, DTensor) and isinstance(s.k, DTensor)):
        return "q or k a DTensor, the other not"
    if s.q.placements != s.k.placements or s.q.device_mesh != s.k.device_mesh:
        return "q and k sharded differently"
    if any(not (isinstance(p, Replicate) or p == Shard(1)) for p in s.q.placements):
        return f"q and k placed {s.q.placements} (only heads sharded, or replicated, is read)"
    _, offset = compute_local_shape_and_global_offset(s.q.shape, s.q.device_mesh, s.q.placements)
    mask = s.mask.to_local() if isinstance(s.mask, DTensor) else s.mask
    local = Scores(s.q.to_local(), s.k.to_local(), s.scaling, mask, s.causal, s.softcap)
    return local, int(offset[1]), s.q.shape[1]


class AttnLogits(Quantity):
    name = "attn_logits"
    uses_forward = True  # the blocks' hook tells whether each block's attention was seen
    sparse = True  # a dozen kernels per attention: on the forward statistics' schedule

    def __init__(self, setup, rule):
        super().__init__(setup, rule)
        self.slots: list[tuple[int, str]] = []  # (block position, module path in the block)
        self._modules: list[tuple[object, str]] = []  # (module, kind) per slot
        self._of_block: dict[int, list[int]] = {}
        self._blind_classes: list[str] = []
        for pos, b in enumerate(setup.blocks):
            found = attention_modules(b.module)
            if not found and type(b.module).__name__ not in self._blind_classes:
                self._blind_classes.append(type(b.module).__name__)
            for name, m, kind in found:
                self._of_block.setdefault(pos, []).append(len(self.slots))
                self.slots.append((pos, name))
                self._modules.append((m, kind))
        self.heads = [0] * len(self.slots)  # global heads of each slot, once seen
        self.ent: torch.Tensor | None = None  # (slots, heads) entropy sums
        self.cnt: torch.Tensor | None = None  # (slots, heads) query rows
        self.top: torch.Tensor | None = None  # (slots,) largest logit
        self._hooks: list = []
        self._probe = None
        self._gens: dict[torch.device, torch.Generator] = {}
        self._step = 0
        self._fresh = True
        self._seen: dict[int, set[int]] = {}  # block -> slots seen since its last forward hook
        self._never: set[int] = set()  # slots that cannot be read (unsupported implementation)
        self._blind: set[int] = set()  # blocks with attention run unseen in this step
        self._exported: tuple[int, frozenset] = (-1, frozenset())
        self._views: dict[tuple, tuple] = {}  # (slot, first head, heads) -> views of the buffers
        self._masks: dict[tuple, torch.Tensor] = {}  # causal masks by shape and device

    # ---- hooks ------------------------------------------------------------------------------

    def attach(self, probe) -> None:
        if self._hooks:
            return
        self._probe = probe
        if self._blind_classes:
            probe._say(
                "attn_blind",
                f"probe: attn_logits cannot see the attention of {', '.join(self._blind_classes)} "
                "(no residual-probe Attention, torch MultiheadAttention or Hugging Face attention "
                "module inside): no attention rows for those blocks",
            )
        for j, (m, kind) in enumerate(self._modules):
            self._hooks.append(watch(kind, m, self._observer(j), self._unseen(j)))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._masks = {}

    def _observer(self, slot: int):
        def observe(scores: Scores) -> None:
            self._add(slot, scores)

        return observe

    def _unseen(self, slot: int):
        def unseen(why: str) -> None:
            self._never.add(slot)
            pos = self.slots[slot][0]
            cls = type(self.setup.blocks[pos].module).__name__
            self._probe._say(
                f"attn_unseen:{why}",
                f"probe: attn_logits cannot read the attention of {cls} ({why}): no attention "
                "rows for those blocks",
            )

        return unseen

    def begin(self, step):
        super().begin(step)
        self._step, self._fresh = step, True
        self._seen.clear()
        self._blind = set()

    def forward(self, pos, block, ins, outs):
        want = self._of_block.get(pos)
        if not want:
            return
        seen = self._seen.pop(pos, set())
        if not set(want) <= seen or any(j in self._never for j in want):
            self._blind.add(pos)
            missed = [self.slots[j][1] for j in want if j not in seen]
            if missed and not any(j in self._never for j in want):
                self._probe._say(
                    f"attn_missed:{type(block.module).__name__}",
                    f"probe: the attention of {type(block.module).__name__} ({', '.join(missed)}) "
                    "ran without the probe seeing it (a fused path, or another attention "
                    "implementation): no attention rows for that block on that step",
                )

    # ---- the statistics ------------------------------------------------------------------------

    def _pick(self, T: int, slot: int, device: torch.device) -> torch.Tensor | None:
        if T <= QUERY_LIMIT:
            return None
        gen = self._gens.get(device)
        if gen is None:
            gen = self._gens[device] = torch.Generator(device=device)
        gen.manual_seed(self.setup.seed * 1_000_003 + self._step * 101 + slot)
        return torch.randperm(T, generator=gen, device=device)[:QUERY_LIMIT].sort().values

    def _add(self, slot: int, scores: Scores) -> None:
        module = self._modules[slot][0]
        if not self.is_active or slot in self._never or not self._probe.records_forward(module):
            return
        local = local_heads(scores)
        if isinstance(local, str):
            self._unseen(slot)(local)
            return
        scores, first, heads = local
        with torch.no_grad():
            pick = self._pick(scores.q.shape[2], slot, scores.q.device)
            peak, ent, cnt = attention_stats(scores, pick, self._masks)
            ent_row, cnt_row, top = self._rows_of(slot, heads, first, ent.shape[0], peak.device)
            ent_row.add_(ent)
            cnt_row.add_(cnt)
            torch.maximum(top, peak, out=top)
        self._seen.setdefault(self.slots[slot][0], set()).add(slot)

    def _rows_of(self, slot: int, heads: int, first: int, local: int, device: torch.device):
        """(entropy sums, row counts, largest logit) of `slot`'s heads first..first+local, views
        into the step's buffers: allocated on the first device seen, zeroed with the step's first
        value, widened when a module has more heads than any before (its rows then move). Views
        are made once, as every view is a dispatched op."""
        self.heads[slot] = heads
        width = max(self.heads)
        if self.ent is None or (self._fresh and self.ent.device != device):
            dtype = buffer_dtype(device)
            self.ent = torch.zeros(len(self.slots), width, dtype=dtype, device=device)
            self.cnt = torch.zeros_like(self.ent)
            self.top = torch.full((len(self.slots),), -math.inf, dtype=dtype, device=device)
            self._views = {}
        elif self._fresh:
            self.ent.zero_()
            self.cnt.zero_()
            self.top.fill_(-math.inf)
        if self.ent.shape[1] < width:
            grow = width - self.ent.shape[1]
            self.ent = torch.nn.functional.pad(self.ent, (0, grow))
            self.cnt = torch.nn.functional.pad(self.cnt, (0, grow))
            self._views = {}
        self._fresh = False
        key = (slot, first, local)
        views = self._views.get(key)
        if views is None:
            h = slice(first, first + local)
            views = self._views[key] = (self.ent[slot, h], self.cnt[slot, h], self.top[slot])
        return views

    # ---- export ---------------------------------------------------------------------------------

    def pooled(self, ctx):
        if not self.is_active or self._fresh:
            return None
        return torch.cat([self.ent.reshape(-1), self.cnt.reshape(-1)])

    def maxima(self, ctx):
        return None if not self.is_active or self._fresh else self.top

    def values(self, ctx, pooled, maxima=None):
        if pooled is None:
            return None
        self._exported = (ctx.step, frozenset(self._blind))
        return torch.cat([pooled, maxima])

    def rows(self, step, host):
        n, width = len(self.slots), (len(host) - len(self.slots)) // (2 * len(self.slots))
        ent, cnt, top = host[: n * width], host[n * width : 2 * n * width], host[2 * n * width :]
        blind = self._exported[1] if self._exported[0] == step else frozenset()
        out = []
        for pos, slots in self._of_block.items():
            if pos in blind:
                continue
            b = self.setup.blocks[pos]
            parts = [(j, range(j * width, j * width + self.heads[j])) for j in slots]
            groups = [("block", parts)]
            if len(slots) > 1:
                groups += [(self.slots[j][1], [(j, heads)]) for j, heads in parts]
            for sublayer, members in groups:
                cells = [i for _, heads in members for i in heads if cnt[i] > 0]
                if not cells:
                    continue
                mean = sum(ent[i] for i in cells) / sum(cnt[i] for i in cells)
                low = _nan_or(min, [ent[i] / cnt[i] for i in cells])
                peak = _nan_or(max, [top[j] for j, _ in members])
                for metric, v in zip(METRICS, (peak, mean, low)):
                    out.append(row(step, b.stack, b.index, sublayer, "-", metric, v))
        return out


def _nan_or(pick, values: list[float]) -> float:
    """min or max of `values`, NaN if any is NaN (Python's min and max drop a NaN by position)."""
    return math.nan if any(math.isnan(v) for v in values) else pick(values)
