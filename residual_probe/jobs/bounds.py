"""The `bounds` job: every theory statement against measurement on the reference models at init.

Runs (each seeded, one forward/backward at initialization through the probe):
- Xiong's statements (Lemma 2, Theorem 1) and the collapse shape on `arch` (default encoder:
  bidirectional self-attention + FFN per block, the lemma's setting), Post-LN and Pre-LN at every
  depth of the ladder, ResiDual at the largest depth; Lemma 2 also in its own setting (Xiong
  init, FFN = d) at the largest depth;
- ResiDual's gradient statements on seq2seq (where docs/design.md says Post-LN's vanishing
  shows: the decoder), Post-LN, Pre-LN and ResiDual at the largest depth, and its Adam
  statement on the same Post-LN model's gradients (torch's Adam, the paper's alpha and eps);
each in Xiong's setting (W^Q = W^K = 0) and with the default (fairseq) initialization.
The collapse closed forms are checked by Monte-Carlo. Statements and tolerances: docs/design.md.

Writes bounds.csv (tidy probe rows), bounds_checks.csv (statement, predicted, measured,
agreement), bounds.json and one figure per statement.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError

CSV_COLUMNS = ("setting", "arch", "placement", "depth", "seed", "stack", "layer", "sublayer", "stream", "metric", "value")
CHECK_COLUMNS = ("statement", "setting", "placement", "predicted", "measured", "agreement")
SETTINGS = ("xiong", "fairseq")
XIONG_PLACEMENTS = ("post-ln", "pre-ln")
GRADIENT_PLACEMENTS = ("post-ln", "pre-ln", "residual")
LADDER = (6, 12, 24, 48, 96)
ADAM_LR, ADAM_EPS = 1e-4, 1e-6  # the ResiDual paper's example (alpha 1e-4, eps 1e-6)
ADAM_METRICS = ("grad_rms", "grad_absmax", "param_count", "adam_kappa")


class BoundsError(UserError):
    """Unusable bounds options; one line for the user."""


@dataclass
class BoundsSpec:
    depths: tuple[int, ...] = (48,)  # one depth: Theorem 1 uses the ladder 6, 12, 24, ... up to it
    arch: str = "encoder"  # architecture for Xiong's statements and the collapse shape
    d_model: int = 128
    heads: int = 4
    ffn: int = 512
    seeds: int = 3
    batch: int = 8
    seq_len: int = 32
    settings: tuple[str, ...] = SETTINGS
    collapse_d: int = 1024  # Monte-Carlo width and tokens for the toy collapse model
    collapse_tokens: int = 64
    force: bool = False  # run even when the memory estimate exceeds what the machine has free
    extra: dict = field(default_factory=dict)

    def depth_ladder(self) -> list[int]:
        top = max(self.depths)
        if len(self.depths) > 1:
            return sorted(set(self.depths))
        return sorted({d for d in LADDER if d < top} | {top})

    def config(self, setting: str, arch: str, placement: str, depth: int, ffn: int | None = None):
        from ..models import ModelConfig

        return ModelConfig(arch=arch, placement=placement, depth=depth, d_model=self.d_model, heads=self.heads,
                           ffn=ffn or self.ffn, init=setting, max_len=max(1024, self.seq_len), **self.extra)

    def validate(self) -> None:
        if not self.depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 2 for d in self.depths):
            raise BoundsError(f"depths: need integers >= 2, got {list(self.depths)}")
        if len(self.depth_ladder()) < 2:
            raise BoundsError(f"Theorem 1's slope needs two depths; give --depth >= 7 or a list, got {list(self.depths)}")
        if self.seeds < 1:
            raise BoundsError(f"seeds: must be >= 1, got {self.seeds}")
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad or not self.settings:
            raise BoundsError(f"settings: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(SETTINGS)}")
        for s in self.settings:  # ModelConfig raises ConfigError naming the field
            self.config(s, self.arch, "pre-ln", max(self.depths))
            self.config(s, "seq2seq", "pre-ln", max(self.depths))


def final_ln_inputs(model, rows: list) -> list:
    """Hooks recording E||x||^2/d at the input of each Post-LN block's last LN (the FFN's norm), the
    quantity of Xiong et al.'s Lemma 2 (metric `final_ln_input_sq_per_dim`, sublayer "ffn")."""
    handles = []
    for stack_name, stack in model.stacks():
        for blk in stack.layers:
            def hook(module, args, stack_name=stack_name, k=blk.k):
                x = args[0].detach().double()
                rows.append({"step": 0, "stack": stack_name, "layer": k, "sublayer": "ffn", "stream": "x",
                             "metric": "final_ln_input_sq_per_dim", "value": float(x.pow(2).mean())})
            handles.append(blk.ffn.norm.register_forward_pre_hook(hook))
    return handles


def adam_conditions(model, lr: float = ADAM_LR, eps: float = ADAM_EPS, rel_step: float = 1e-4) -> list[dict]:
    """Per block of every stack: gradient RMS, parameter count, and the condition number kappa of
    torch Adam's first update, measured as the finite difference of the update's norm in the
    gradient's scale: (||u((1 + h) g)|| - ||u(g)||) / (h * rms(g)), in float64 (theory.py's
    `adam_update_condition` is its closed form). Metrics `grad_rms`, `grad_absmax`, `param_count`,
    `adam_kappa`."""
    import torch

    rows = []
    for stack_name, stack in model.stacks():
        for blk in stack.layers:
            g = torch.cat([p.grad.detach().double().flatten() for p in blk.parameters() if p.grad is not None])
            norms = []
            for scale in (1.0, 1.0 + rel_step):
                w = torch.zeros_like(g, requires_grad=True)
                opt = torch.optim.Adam([w], lr=lr, eps=eps)
                w.grad = scale * g
                opt.step()
                norms.append(float(w.detach().norm()))
            rms = float(g.pow(2).mean().sqrt())
            kappa = (norms[1] - norms[0]) / (rel_step * rms) if rms > 0 else float("nan")
            for metric, value in (("grad_rms", rms), ("grad_absmax", float(g.abs().max())),
                                  ("param_count", float(g.numel())), ("adam_kappa", kappa)):
                rows.append({"step": 0, "stack": stack_name, "layer": blk.k, "sublayer": "block", "stream": "x",
                             "metric": metric, "value": value})
    return rows


def measure(cfg, seed: int, batch: int, seq_len: int, adam: bool = False) -> list[dict]:
    """One forward/backward at initialization, recorded by the probe: its rows, plus the embedding's
    E||x_0||^2/d per stack (metric `embed_norm_sq_per_dim`, layer -1) from the token subsample; for
    Post-LN the inputs of each block's last LN (`final_ln_inputs`); with `adam`, `adam_conditions`."""
    import torch

    from ..analysis.metrics import norm_sq_per_dim
    from ..data import BatchSource
    from ..models import Transformer
    from ..probe import Probe
    from ..training import Trainer

    torch.manual_seed(seed)
    model = Transformer(cfg)
    b = BatchSource(cfg.arch, batch, seq_len, cfg.vocab_size, seed).next()
    probe = Probe(model, quantities=("param_grad_norm", "w2_grad_norm", "forward_stats", "subsample"), seed=seed)
    extra: list[dict] = []
    handles = final_ln_inputs(model, extra) if cfg.placement == "post-ln" else []
    with probe:
        Trainer(model, probe).step(b, update=False)  # one forward/backward, recorded; no update
    for h in handles:
        h.remove()
    rows = [r for r in probe.rows() if r["metric"] != "nonfinite_count"] + extra
    if adam:
        rows += adam_conditions(model)
    for (stack, stream), sub in probe.subsamples().items():
        if stream == "x":
            rows.append({"step": 0, "stack": stack, "layer": -1, "sublayer": "embed", "stream": "x",
                         "metric": "embed_norm_sq_per_dim", "value": float(norm_sq_per_dim(sub[0]))})
    return rows


def _select(rows, **where):
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def _table(rows, seeds: int, n_layers: int):
    """(seeds, layers) array of values from rows with seed and layer keys."""
    import numpy as np

    out = np.full((seeds, n_layers), np.nan)
    for r in rows:
        out[r["seed"], r["layer"]] = r["value"]
    return out


def run_bounds(spec: BoundsSpec, out: str | Path, formats=("png",), progress=None, echo=None) -> dict:
    """Measure, check and draw every statement; writes into `out` and returns the JSON sidecar dict.

    `progress(total)` may return a callable advanced once per model run; `echo(line, err=...)` hears
    the memory estimate (budget.require), which refuses a run too big.
    """
    import numpy as np

    from .. import budget
    from ..analysis import checks, theory
    from ..analysis import metrics as M
    from ..analysis.collapse import inverse_sqrt_reference
    from ..plots import bounds as plots
    from ..output import prepare_out, versions, write_csv, write_json

    spec.validate()
    budget.require(budget.bounds_estimate(spec), spec.force, echo)  # before anything is built or written
    out = prepare_out(out)
    ladder, top = spec.depth_ladder(), max(spec.depths)
    # (setting label, init, arch, placement, depth, ffn): "lemma" is Xiong's Lemma 2 in its own
    # setting (Xiong init, square FFN), beside the same statements at the default sizes.
    runs = [(s, s, spec.arch, p, d, spec.ffn) for s in spec.settings for p in XIONG_PLACEMENTS for d in ladder]
    if spec.ffn != spec.d_model:
        runs += [("lemma", "xiong", spec.arch, p, top, spec.d_model) for p in XIONG_PLACEMENTS]
    runs += [(s, s, spec.arch, "residual", top, spec.ffn) for s in spec.settings]
    runs += [(s, s, "seq2seq", p, top, spec.ffn) for s in spec.settings for p in GRADIENT_PLACEMENTS]
    advance = progress(len(runs) * spec.seeds) if progress else None

    rows, timings, t_all = [], {}, time.perf_counter()
    for setting, init, arch, placement, depth, ffn in runs:
        t0 = time.perf_counter()
        for seed in range(spec.seeds):
            cfg = spec.config(init, arch, placement, depth, ffn)
            adam = arch == "seq2seq" and placement == "post-ln"
            for r in measure(cfg, seed, spec.batch, spec.seq_len, adam=adam):
                rows.append({"setting": setting, "arch": arch, "placement": placement, "depth": depth, "seed": seed,
                             **{k: r[k] for k in ("stack", "layer", "sublayer", "stream", "metric", "value")}})
            if advance:
                advance()
        timings[f"{setting}/{arch}/{placement}/{depth}"] = round(time.perf_counter() - t0, 3)
    wall_models = time.perf_counter() - t_all
    S = spec.seeds
    xstack = "encoder" if spec.arch == "encoder" else "decoder"
    all_checks, figs = [], []

    # Xiong Lemma 2 at the largest depth: Post-LN at the input of each block's last LN, Pre-LN on
    # the stream; in the lemma's own setting ("lemma": Xiong init, FFN = d) and at the default sizes
    lemma = {}
    lemma_settings = (["lemma"] if spec.ffn != spec.d_model else []) + list(spec.settings)
    for setting in lemma_settings:
        init = "xiong" if setting == "lemma" else setting
        ffn = spec.d_model if setting == "lemma" else spec.ffn
        label = f"{spec.arch}, {init} init, d {spec.d_model}, FFN {ffn}" + (" (the lemma's setting)" if setting == "lemma" else "")
        sel = dict(setting=setting, arch=spec.arch, depth=top, stack=xstack, stream="x")
        post = _table(_select(rows, metric="final_ln_input_sq_per_dim", placement="post-ln", **sel), S, top)
        check, post_data = checks.lemma2_postln(label, post, spec.d_model, ffn, init)
        all_checks.append(check)
        norm_sq = _table(_select(rows, metric="norm_sq_per_dim", placement="pre-ln", **sel), S, top)
        v0 = float(np.mean([r["value"] for r in _select(rows, metric="embed_norm_sq_per_dim", placement="pre-ln", **sel)]))
        check, pre_data = checks.lemma2_preln(label, norm_sq, v0, spec.d_model, ffn, init)
        all_checks.append(check)
        lemma[setting] = {"title": label, "post": post_data, "pre": pre_data}
    figs += plots.plot_lemma2(lemma, top, out / "bounds_lemma2", formats)

    # Xiong Theorem 1: last block's W2 gradient against depth
    thm = {}
    for setting in spec.settings:
        for p in XIONG_PLACEMENTS:
            w2 = np.array([[_select(rows, setting=setting, arch=spec.arch, placement=p, depth=d, seed=s, stack=xstack,
                                    metric="w2_grad_norm")[0]["value"] for d in ladder] for s in range(S)])
            check, data = checks.theorem1(f"{setting}/{spec.arch}", p, ladder, w2)
            all_checks.append(check)
            thm[(setting, p)] = data
    figs += plots.plot_theorem1(thm, out / "bounds_theorem1", formats)

    # ResiDual gradient statements: per-block gradient norms of seq2seq, both stacks
    grad = {}
    for setting in spec.settings:
        for stack, n_sub in (("encoder", 2), ("decoder", 3)):
            for p in GRADIENT_PLACEMENTS:
                g = _table(_select(rows, setting=setting, arch="seq2seq", placement=p, stack=stack, sublayer="block",
                                   metric="param_grad_norm"), S, top)
                check, data = checks.residual_gradient(setting, stack, p, g, n_sub)
                all_checks.append(check)
                grad[(setting, stack, p)] = data
    figs += plots.plot_residual_gradient(grad, out / "bounds_residual_gradient", formats)

    # ResiDual collapse: toy Monte-Carlo against closed forms, and the shape on the models
    k = np.arange(1, top + 1)
    toy = {}
    for i, p in enumerate(GRADIENT_PLACEMENTS):
        X = theory.simulate_collapse(p, top, spec.collapse_d, spec.collapse_tokens, seed=i)
        mc = {m: np.array([fn(X[j - 1], X[j]).item() for j in k]) for m, fn in
              (("cos_adjacent", M.cos_adjacent), ("ln_update", M.ln_update))}
        pred = {m: v for m, v in theory.collapse_prediction(p, k).items() if m in mc}
        all_checks.append(checks.collapse_toy(p, mc, pred, checks.collapse_toy_rtol(spec.collapse_d, spec.collapse_tokens)))
        toy[p] = {"mc": mc, "pred": pred}
    model_lnu = {}
    for setting in spec.settings:
        for p in GRADIENT_PLACEMENTS:
            lnu = _table(_select(rows, setting=setting, arch=spec.arch, placement=p, depth=top, stack=xstack, stream="x",
                                 metric="ln_update"), S, top)
            rel = _table(_select(rows, setting=setting, arch=spec.arch, placement=p, depth=top, stack=xstack, stream="x",
                                 metric="relative_update"), S, top)
            all_checks += checks.collapse_model(f"{setting}/{spec.arch}", p, lnu, rel)
            model_lnu[(setting, p)] = {"ln_update": lnu,
                                       "closed_form": theory.collapse_from_relative_update(rel.mean(0))["ln_update"],
                                       "inverse_sqrt": inverse_sqrt_reference(lnu.mean(0))}
    figs += plots.plot_collapse(toy, model_lnu, out / "bounds_collapse", formats)

    # ResiDual's Adam argument: torch Adam's update on the Post-LN seq2seq model's own gradients
    adam = {}
    for setting in spec.settings:
        for stack in ("encoder", "decoder"):
            sel = dict(setting=setting, arch="seq2seq", placement="post-ln", stack=stack, sublayer="block")
            t = {m: _table(_select(rows, metric=m, **sel), S, top) for m in ADAM_METRICS}
            t["kappa_over_paper"] = t["adam_kappa"] / theory.residual_adam_condition(ADAM_LR, t["param_count"], ADAM_EPS)
            adam[(setting, stack)] = t
        both = {m: np.concatenate([adam[(setting, st)][m].ravel() for st in ("encoder", "decoder")]) for m in ADAM_METRICS}
        all_checks.append(checks.adam(f"{setting}/seq2seq N={top}", both["grad_rms"], both["grad_absmax"],
                                      both["param_count"], both["adam_kappa"], ADAM_LR, ADAM_EPS))
    figs += plots.plot_adam(adam, ADAM_LR, ADAM_EPS, theory.adam_condition_curve(ADAM_LR, ADAM_EPS),
                            out / "bounds_adam", formats)

    wall = time.perf_counter() - t_all
    check_rows = [c.to_row() for c in all_checks]
    nonfinite = sum(1 for r in rows if not math.isfinite(r["value"]))
    files = [write_csv(out / "bounds.csv", rows, CSV_COLUMNS), write_csv(out / "bounds_checks.csv", check_rows, CHECK_COLUMNS)]
    meta = {
        "job": "bounds", "spec": asdict(spec), "depth_ladder": ladder, "seeds": list(range(S)),
        "versions": versions(), "wall_seconds": round(wall, 3), "model_seconds": round(wall_models, 3),
        "run_seconds": timings, "nonfinite_values": nonfinite, "checks": check_rows,
        "files": [str(p) for p in files + figs],
    }
    meta["files"].append(str(write_json(out / "bounds.json", meta)))
    return meta
