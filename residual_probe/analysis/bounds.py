"""The theory statements that `bounds` checks, one function each: the tidy probe rows of the
reference models at initialization in (jobs.bounds.measure_bounds', with setting, arch, placement,
depth and seed), the checks (analysis.checks) and what the statement's figure draws out.

Statements and tolerances: docs/design.md.
- `check_lemma2`: Xiong et al. 2020 Lemma 2 (Post-LN at the input of each block's last LN, Pre-LN
  on the stream), in the lemma's own setting and at the default sizes;
- `check_theorem1`: Xiong et al. 2020 Theorem 1, the last block's W2 gradient against depth;
- `check_gradients`: ResiDual's gradient statements, per-block gradient norms of seq2seq;
- `check_collapse`: ResiDual's collapse closed forms against a Monte-Carlo toy, and the shape on the models;
- `check_adam`: ResiDual's Adam argument on the Post-LN seq2seq model's own gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..models.placements import PAPER_PLACEMENTS
from . import checks, theory
from .checks import Check

XIONG_PLACEMENTS = ("post-ln", "pre-ln")  # Xiong et al. 2020's Theorem 1 compares these two
GRADIENT_PLACEMENTS = PAPER_PLACEMENTS  # ResiDual's gradient statements
ADAM_LR, ADAM_EPS = 1e-4, 1e-6  # the ResiDual paper's example (alpha 1e-4, eps 1e-6)
ADAM_METRICS = ("grad_rms", "grad_absmax", "param_count", "adam_kappa")


@dataclass(frozen=True)
class Runs:
    """What the statements need to know of the runs measured: Xiong's statements ran on `arch` at every
    depth of `ladder` ("lemma": Xiong init and FFN = d at the top depth, where the default FFN is not d),
    ResiDual's gradient statements on seq2seq at the top depth; each in every setting, with `seeds` seeds."""

    arch: str
    d_model: int
    ffn: int
    settings: tuple[str, ...]
    seeds: int
    ladder: tuple[int, ...]

    @property
    def top(self) -> int:
        return max(self.ladder)

    @property
    def stack(self) -> str:
        """The stack Xiong's statements read: an encoder's, else the decoder."""
        return "encoder" if self.arch == "encoder" else "decoder"


def select(rows: list[dict], **where) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def table(rows: list[dict], seeds: int, n_layers: int) -> np.ndarray:
    """(seeds, layers) array of values from rows with seed and layer keys (NaN where none)."""
    out = np.full((seeds, n_layers), np.nan)
    for r in rows:
        out[r["seed"], r["layer"]] = r["value"]
    return out


def check_lemma2(rows: list[dict], runs: Runs) -> tuple[list[Check], dict]:
    """Lemma 2 at the top depth: Post-LN's E||x||^2/d at the input of each block's last LN, and Pre-LN's
    on the stream against its band. Figure data: setting -> {title, post, pre}."""
    found, data = [], {}
    top, S = runs.top, runs.seeds
    settings = (["lemma"] if runs.ffn != runs.d_model else []) + list(runs.settings)
    for setting in settings:
        init = "xiong" if setting == "lemma" else setting
        ffn = runs.d_model if setting == "lemma" else runs.ffn
        label = f"{runs.arch}, {init} init, d {runs.d_model}, FFN {ffn}" + (
            " (the lemma's setting)" if setting == "lemma" else ""
        )
        sel = dict(setting=setting, arch=runs.arch, depth=top, stack=runs.stack, stream="x")
        post = table(
            select(rows, metric="final_ln_input_sq_per_dim", placement="post-ln", **sel), S, top
        )
        check, post_data = checks.lemma2_postln(label, post, runs.d_model, ffn, init)
        found.append(check)
        norm_sq = table(select(rows, metric="norm_sq_per_dim", placement="pre-ln", **sel), S, top)
        v0 = float(
            np.mean(
                [
                    r["value"]
                    for r in select(rows, metric="embed_norm_sq_per_dim", placement="pre-ln", **sel)
                ]
            )
        )
        check, pre_data = checks.lemma2_preln(label, norm_sq, v0, runs.d_model, ffn, init)
        found.append(check)
        data[setting] = {"title": label, "post": post_data, "pre": pre_data}
    return found, data


def check_theorem1(rows: list[dict], runs: Runs) -> tuple[list[Check], dict]:
    """Theorem 1: the last block's W2 gradient norm against depth, per setting and placement.
    Figure data: (setting, placement) -> the check's data."""
    found, data = [], {}
    for setting in runs.settings:
        for p in XIONG_PLACEMENTS:
            w2 = np.array(
                [
                    [
                        select(
                            rows,
                            setting=setting,
                            arch=runs.arch,
                            placement=p,
                            depth=d,
                            seed=s,
                            stack=runs.stack,
                            metric="w2_grad_norm",
                        )[0]["value"]
                        for d in runs.ladder
                    ]
                    for s in range(runs.seeds)
                ]
            )
            check, data[(setting, p)] = checks.theorem1(
                f"{setting}/{runs.arch}", p, list(runs.ladder), w2
            )
            found.append(check)
    return found, data


def check_gradients(rows: list[dict], runs: Runs) -> tuple[list[Check], dict]:
    """ResiDual's gradient statements on seq2seq at the top depth, both stacks, every placement.
    Figure data: (setting, stack, placement) -> the check's data."""
    found, data = [], {}
    for setting in runs.settings:
        for stack, n_sub in (("encoder", 2), ("decoder", 3)):
            for p in GRADIENT_PLACEMENTS:
                g = table(
                    select(
                        rows,
                        setting=setting,
                        arch="seq2seq",
                        placement=p,
                        stack=stack,
                        sublayer="block",
                        metric="param_grad_norm",
                    ),
                    runs.seeds,
                    runs.top,
                )
                check, data[(setting, stack, p)] = checks.residual_gradient(
                    setting, stack, p, g, n_sub
                )
                found.append(check)
    return found, data


def check_collapse(
    rows: list[dict], runs: Runs, collapse_d: int, collapse_tokens: int
) -> tuple[list[Check], dict, dict]:
    """ResiDual's collapse: a Monte-Carlo toy of width `collapse_d` over `collapse_tokens` tokens against
    the closed forms, and the shape on the models at the top depth. Figure data: the toy's
    placement -> {mc, pred}, and the models' (setting, placement) -> {ln_update, closed_form, inverse_sqrt}."""
    from . import metrics as M
    from .collapse import inverse_sqrt_reference

    found, toy, models = [], {}, {}
    top, S = runs.top, runs.seeds
    k = np.arange(1, top + 1)
    for i, p in enumerate(GRADIENT_PLACEMENTS):
        X = theory.simulate_collapse(p, top, collapse_d, collapse_tokens, seed=i)
        mc = {
            m: np.array([fn(X[j - 1], X[j]).item() for j in k])
            for m, fn in (("cos_adjacent", M.cos_adjacent), ("ln_update", M.ln_update))
        }
        pred = {m: v for m, v in theory.collapse_prediction(p, k).items() if m in mc}
        found.append(
            checks.collapse_toy(p, mc, pred, checks.collapse_toy_rtol(collapse_d, collapse_tokens))
        )
        toy[p] = {"mc": mc, "pred": pred}
    for setting in runs.settings:
        for p in GRADIENT_PLACEMENTS:
            sel = dict(
                setting=setting,
                arch=runs.arch,
                placement=p,
                depth=top,
                stack=runs.stack,
                stream="x",
            )
            lnu = table(select(rows, metric="ln_update", **sel), S, top)
            rel = table(select(rows, metric="relative_update", **sel), S, top)
            found += checks.collapse_model(f"{setting}/{runs.arch}", p, lnu, rel)
            models[(setting, p)] = {
                "ln_update": lnu,
                "closed_form": theory.collapse_from_relative_update(rel.mean(0))["ln_update"],
                "inverse_sqrt": inverse_sqrt_reference(lnu.mean(0)),
            }
    return found, toy, models


def check_adam(
    rows: list[dict], runs: Runs, lr: float = ADAM_LR, eps: float = ADAM_EPS
) -> tuple[list[Check], dict]:
    """ResiDual's Adam argument: torch Adam's first update on the Post-LN seq2seq model's own gradients
    (jobs.bounds.adam_conditions' rows). Figure data: (setting, stack) -> metric -> (seeds, blocks)."""
    found, data = [], {}
    top, S = runs.top, runs.seeds
    for setting in runs.settings:
        for stack in ("encoder", "decoder"):
            sel = dict(
                setting=setting, arch="seq2seq", placement="post-ln", stack=stack, sublayer="block"
            )
            t = {m: table(select(rows, metric=m, **sel), S, top) for m in ADAM_METRICS}
            t["kappa_over_paper"] = t["adam_kappa"] / theory.residual_adam_condition(
                lr, t["param_count"], eps
            )
            data[(setting, stack)] = t
        both = {
            m: np.concatenate([data[(setting, st)][m].ravel() for st in ("encoder", "decoder")])
            for m in ADAM_METRICS
        }
        found.append(
            checks.adam(
                f"{setting}/seq2seq N={top}",
                both["grad_rms"],
                both["grad_absmax"],
                both["param_count"],
                both["adam_kappa"],
                lr,
                eps,
            )
        )
    return found, data
