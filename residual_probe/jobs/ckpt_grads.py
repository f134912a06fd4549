"""`grad-norms --ckpt`: per-block gradient norms of real checkpoints on real text.

For each checkpoint: load it safely (residual_probe.checkpoints), read its placement from its
block structure, cut the text into windows (checkpoints.text, the data contract), and take one
gradient of the mean loss over all predicted positions of all windows, accumulated over batches
of `batch` windows (model in eval mode: dropout off; gradients on). The probe reads every
block's parameter-gradient norm from `.grad` after the last batch. Losses:
- causal-lm: next-token cross-entropy, positions 0..L-2 of each window predict 1..L-1;
- mlm: 15 % of positions (seeded; at least one per window) replaced by the mask token, predicted;
- seq2seq: the window is both source and target (a copy task), teacher-forced: the decoder
  reads [start] + target[:-1] and predicts all L target tokens.
Writes grad_norms.csv (the reference runs' columns, with `model`, the model's label, in place of
`placement`; seed 0, step 0), grad_norms.json (per model: label, detected placement, norm type, loss, data, verdicts)
and grad_norms.png.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from ..errors import UserError
from .inspection import CheckpointInputs, Inspection, inspect_checkpoint

CSV_COLUMNS = ("model", "seed", "step", "stack", "layer", "sublayer", "param_grad_norm")
MASK_RATE = 0.15
GRADIENT = ("param_grad_norm",)  # the probe quantity of one gradient


@dataclass
class CkptGradSpec(CheckpointInputs):
    loss: str | None = (
        None  # causal-lm / seq2seq / mlm / contrastive; None: the checkpoint's own head
    )
    skip_without_head: bool = (
        False  # diagnose: a model with no loss head is skipped (listed), not an error
    )

    def validate(self) -> None:
        from ..checkpoints import LOSSES
        from ..models import ConfigError

        super().validate()
        if self.loss is not None and self.loss not in LOSSES:
            raise ConfigError(f"--loss: unknown {self.loss!r}; choose one of {', '.join(LOSSES)}")


class NoLossHead(UserError):
    """The checkpoint defines no loss the user asked for; one line naming the choices."""


TEMPERATURE = 0.05  # SimCSE's (Gao et al. 2021)


def simcse_logits(loaded, ids, temperature: float = TEMPERATURE):
    """Unsupervised SimCSE (Gao et al. 2021) as logits for cross-entropy: each window encoded twice
    with dropout on (two views), mean-pooled over its tokens; logits[i, 0, j] = cos(z1_i, z2_j) / tau,
    the target of row i is i (in-batch negatives). Returns (B, 1, B)."""
    import torch.nn.functional as F

    from ..checkpoints.loaded import hidden_states

    model = loaded.model
    was = model.training
    model.train()  # dropout is the augmentation
    try:
        z1 = hidden_states(loaded.forward(ids)).mean(dim=1)
        z2 = hidden_states(loaded.forward(ids)).mean(dim=1)
    finally:
        model.train(was)
    return (F.cosine_similarity(z1[:, None, :], z2[None, :, :], dim=-1) / temperature)[:, None, :]


def choose_loss(loaded, asked: str | None, headless_default: str | None = None) -> str:
    """The loss to take the gradient of: `asked`, else the checkpoint's own head, else
    `headless_default` (diagnose: "contrastive" for a bare encoder)."""
    from ..checkpoints import LOSSES

    if asked == "contrastive" or (
        asked is None and loaded.default_loss is None and headless_default
    ):
        if loaded.modality != "text":
            raise NoLossHead(f"{loaded.source}: the contrastive loss needs a text model")
        return "contrastive"
    kind = asked or loaded.default_loss
    if kind is None:
        raise NoLossHead(
            f"{loaded.source}: {type(loaded.model).__name__} has no head that defines a loss; "
            f"--loss chooses among {', '.join(LOSSES)} (--loss contrastive needs no head: "
            "unsupervised SimCSE, as sentence encoders are trained)"
        )
    if kind not in loaded.heads:
        have = ", ".join(loaded.heads) or "none"
        raise NoLossHead(
            f"{loaded.source}: --loss {kind} needs a head this model lacks (its heads: {have}; "
            f"choices: {', '.join(LOSSES)})"
        )
    if kind == "mlm" and loaded.mask_id is None:
        raise NoLossHead(
            f"{loaded.source}: masked-LM loss needs a mask token, and the folder has no tokenizer "
            "that defines one"
        )
    return kind


def loss_batches(
    loaded, kind: str, windows, batch: int, seed: int
) -> tuple[list[tuple[tuple, object]], int]:
    """[(inputs, targets)] per batch of windows, and the number of predicted positions in all of them.

    targets hold -100 where nothing is predicted; logits(*inputs) align with targets position by position.
    """
    import torch

    out = []
    if (
        kind == "contrastive"
    ):  # targets: window i's two views match; the batch's other windows are negatives
        parts = list(windows.split(batch))
        if (
            len(parts) > 1 and parts[-1].shape[0] == 1
        ):  # one window alone has no negative: join the previous batch
            parts[-2:] = [torch.cat(parts[-2:])]
        if parts[0].shape[0] < 2:
            from ..errors import UserError

            raise UserError(
                "--loss contrastive needs at least 2 windows of text (in-batch negatives)"
            )
        out = [((w,), torch.arange(w.shape[0])[:, None]) for w in parts]
        return out, sum(w.shape[0] for w in parts)
    if kind == "mlm":
        gen = torch.Generator().manual_seed(seed)
        masked = torch.rand(windows.shape, generator=gen) < MASK_RATE
        masked[:, 0] |= ~masked.any(dim=1)  # at least one target per window
        inputs = windows.masked_fill(masked, loaded.mask_id)
        targets = windows.masked_fill(~masked, -100)
        for i, t in zip(inputs.split(batch), targets.split(batch)):
            out.append(((i,), t))
    elif kind == "causal-lm":
        for w in windows.split(batch):
            # position t predicts token t + 1; the last position predicts nothing
            out.append(((w,), torch.cat([w[:, 1:], torch.full_like(w[:, :1], -100)], dim=1)))
    else:  # seq2seq: copy task, teacher-forced
        for w in windows.split(batch):
            start = torch.full_like(w[:, :1], loaded.decoder_start_id or 0)
            out.append(((w, torch.cat([start, w[:, :-1]], dim=1)), w))
    total = sum(int((t != -100).sum()) for _, t in out)
    return out, total


def accumulate_gradient(loaded, kind: str, batches, total: int, advance=None) -> tuple[float, int]:
    """Backpropagate sum(CE over predicted positions) / total, batch by batch; returns the mean loss
    and the number of classes it was taken over (the vocabulary: ln V is the uniform guess's loss)."""
    import torch
    import torch.nn.functional as F

    head = (lambda ids: simcse_logits(loaded, ids)) if kind == "contrastive" else loaded.heads[kind]
    loaded.model.zero_grad(set_to_none=True)
    loss_sum, vocab = 0.0, 0
    with torch.enable_grad():
        for inputs, targets in batches:
            logits = head(*inputs)  # (B, T, V)
            vocab = logits.shape[-1]
            loss = F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
            )
            (loss / total).backward()
            loss_sum += float(loss.detach())
            del logits, loss
            if advance:
                advance()
    return loss_sum / total, vocab


class Gradient(NamedTuple):
    """One gradient of a checkpoint (`model_gradients`)."""

    rows: list[dict]  # param_grad_norm per block and sublayer, and of the parts outside the blocks
    mean_loss: float
    blocks: list
    vocab: int  # the loss's number of classes (ln V: a uniform guess's loss)
    unused: dict[str, list[str]]  # parts the loss does not reach: {part: parameter names}
    forward: dict | None  # collapse's forward statistics of the same pass (`forward=`), or None


def one_pass(kind: str, loaded) -> bool:
    """Whether the loss's forward pass is the one `collapse` measures, so that diagnose takes the
    forward statistics from it: causal-LM windows as they are. The masked LM masks inputs, the
    contrastive loss runs two dropout views, seq2seq shifts the decoder's input: those take a
    forward pass of their own."""
    return kind == "causal-lm" and loaded.modality == "text"


def model_gradients(
    loaded,
    kind: str,
    windows,
    batch: int,
    seed: int = 0,
    blocks: str | None = None,
    advance=None,
    forward=None,
) -> Gradient:
    """Probe rows of one gradient (every parameter requires grad, so a part without any `.grad` is
    unused by this loss, e.g. BERT's pooler under a loss on the token states; its rows are left out
    rather than NaN).

    forward: a CollapseSpec whose windows and batches are these (`one_pass`): the same pass also
    records collapse's forward statistics (`jobs.collapse.forward_result`), one probe on the blocks.
    """
    from ..probe import Probe

    for p in loaded.model.parameters():
        p.requires_grad_(True)
    batches, total = loss_batches(loaded, kind, windows, batch, seed)
    if forward is None:
        probe, norms = Probe(loaded.model, quantities=GRADIENT, blocks=blocks, group=None), None
    else:
        from .collapse import TokenNorms, forward_probe

        probe = forward_probe(loaded, forward, also=GRADIENT)
        norms = TokenNorms(probe.blocks)
    t0 = time.perf_counter()
    try:
        with probe, warnings.catch_warnings():
            # a part without .grad is reported by name below, not as the probe's generic warning
            warnings.filterwarnings("ignore", message=r"probe: .* had no \.grad")
            mean_loss, vocab = accumulate_gradient(loaded, kind, batches, total, advance)
            unused = probe.parts.without_grad()
            rows = probe.step()
    finally:
        if norms is not None:
            norms.remove()
    loaded.model.zero_grad(set_to_none=True)
    grads = [r for r in rows if r["metric"] in GRADIENT]
    measured = None
    if forward is not None:
        from .collapse import forward_result

        others = [r for r in rows if r["metric"] not in GRADIENT]
        measured = forward_result(probe, others, norms, time.perf_counter() - t0)
    return Gradient(
        [
            r
            for r in grads
            if not r["sublayer"].startswith("group:")
            and not (r["stack"] == "model" and r["sublayer"] in unused)
        ],
        mean_loss,
        probe.blocks,
        vocab,
        unused,
        measured,
    )


def run_ckpt_grad_norms(
    spec: CkptGradSpec, out: str | Path, formats=("png",), progress=None
) -> dict:
    """Measure every checkpoint; write grad_norms.csv/.json/.png into `out`; returns the JSON dict."""
    from ..output import prepare_out

    spec.validate()
    out = prepare_out(out)
    text, source, dictionary = spec.read_inputs()
    rows, models = [], []
    t_start = time.perf_counter()
    for label, path in spec.named():
        inspection = inspect_checkpoint(label, path, spec, text, dictionary)
        model, table, _ = measure_gradients(inspection, spec, text, source, progress)
        models.append(model)
        rows += table
        del inspection
    return write_gradients(out, spec, models, rows, source, formats, time.perf_counter() - t_start)


def measure_gradients(
    inspection: Inspection,
    spec: CkptGradSpec,
    text: str,
    source: str,
    progress=None,
    forward=None,
) -> tuple[dict, list[dict], dict | None]:
    """One checkpoint's gradient: its grad_norms.json entry, its grad_norms.csv rows (none when a
    model without a loss head is skipped), and collapse's forward statistics of the same pass when
    `forward` (a CollapseSpec on the same text) is given and the loss allows it (`one_pass`), else
    None."""
    from ..analysis.diagnosis import gradient_verdicts, loss_warnings, whole_model_norms
    from ..checkpoints.text import text_windows

    label, loaded = inspection.label, inspection.loaded
    if loaded.modality != "text":
        loaded.heads = {}  # no text loss for a vision model
    try:
        kind = choose_loss(loaded, spec.loss, "contrastive" if spec.skip_without_head else None)
    except NoLossHead as exc:
        if not spec.skip_without_head:
            raise
        skipped = {"label": label, "source": inspection.path, "skipped": str(exc), "verdicts": []}
        return skipped, [], None
    t1 = time.perf_counter()
    w = text_windows(loaded, text, spec.tokens, spec.seq_len, inspection.dictionary)
    require_gradient_memory(inspection, kind, tuple(w.ids.shape), spec)
    advance = progress(math.ceil(w.ids.shape[0] / spec.batch)) if progress else None
    same_pass = forward if forward is not None and one_pass(kind, loaded) else None
    g = model_gradients(loaded, kind, w.ids, spec.batch, spec.seed, spec.blocks, advance, same_pass)
    model_rows, mean_loss, vocab, unused = g.rows, g.mean_loss, g.vocab, g.unused
    t2 = time.perf_counter()
    table = [
        {
            "model": label,
            "seed": 0,
            "step": 0,
            "stack": r["stack"],
            "layer": r["layer"],
            "sublayer": r["sublayer"],
            "param_grad_norm": r["value"],
        }
        for r in model_rows
    ]
    model = {
        **inspection.description(),
        "loss": kind,
        "mean_loss": mean_loss,
        "data": {**w.info, "batch": spec.batch, "source": source, "messages": w.messages},
        "verdicts": gradient_verdicts(table),
        "vocab_size": vocab,
        "whole_model": whole_model_norms(table),
        "no_gradient": unused,  # parts the loss does not reach: {part: parameter names}
        # the uniform-guess test is about a vocabulary; a contrastive loss's classes are the batch
        "warnings": loss_warnings(mean_loss, vocab, loaded.family) if kind != "contrastive" else [],
        "nonfinite_values": sum(1 for r in table if not math.isfinite(r["param_grad_norm"])),
        "times": {"load_s": inspection.load_s, "gradient_s": t2 - t1},
    }
    return model, table, g.forward


def require_gradient_memory(
    inspection: Inspection, kind: str, windows: tuple[int, int], spec: CkptGradSpec
) -> None:
    """Refuse (budget.BudgetError) a gradient whose gradients, saved activations and logits would not
    fit, before the first batch runs; `spec.force` runs it anyway."""
    from .. import budget

    loaded = inspection.loaded
    n_windows, seq_len = windows
    # the contrastive loss encodes each window twice (two dropout views) and keeps both for backward
    batch = min(spec.batch, n_windows) * (2 if kind == "contrastive" else 1)
    est = budget.ckpt_gradient_estimate(
        inspection.label,
        loaded.parameters,
        len(inspection.blocks),
        loaded.width or 0,
        batch,
        seq_len,
        0 if kind == "contrastive" else loaded.vocab_size or 0,
    )
    budget.check(est, spec.force)


def write_gradients(
    out: Path,
    spec: CkptGradSpec,
    models: list[dict],
    rows: list[dict],
    source: str,
    formats,
    wall_seconds: float,
) -> dict:
    """grad_norms.csv, .png and .json of the measured checkpoints; returns the JSON dict."""
    from ..output import versions, write_csv, write_json
    from ..plots.diagnosis import plot_checkpoint_gradients

    files = [write_csv(out / "grad_norms.csv", rows, CSV_COLUMNS)]
    if rows:
        files += plot_checkpoint_gradients(
            rows, {m["label"]: m for m in models}, out / "grad_norms", formats
        )
    meta = {
        "job": "grad-norms --ckpt",
        "spec": {**asdict(spec), "ckpts": list(spec.ckpts)},
        "models": models,
        "data_source": source,
        "versions": versions(),
        "wall_seconds": round(wall_seconds, 3),
    }
    meta["files"] = [str(f) for f in files] + [str(out / "grad_norms.json")]
    write_json(out / "grad_norms.json", meta)
    return meta
