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
from dataclasses import asdict, dataclass
from pathlib import Path

from ..analysis.bounds import ADAM_EPS, ADAM_LR, GRADIENT_PLACEMENTS, XIONG_PLACEMENTS
from ..errors import UserError
from .reference import ReferenceModel

CSV_COLUMNS = (
    "setting",
    "arch",
    "placement",
    "depth",
    "seed",
    "stack",
    "layer",
    "sublayer",
    "stream",
    "metric",
    "value",
)
CHECK_COLUMNS = ("statement", "setting", "placement", "predicted", "measured", "agreement")
SETTINGS = ("xiong", "fairseq")
LADDER = (6, 12, 24, 48, 96)


class BoundsError(UserError):
    """Unusable bounds options; one line for the user."""


@dataclass
class BoundsSpec(ReferenceModel):
    arch: str = "encoder"  # architecture for Xiong's statements and the collapse shape
    d_model: int = 128
    ffn: int = 512
    depths: tuple[int, ...] = (48,)  # one depth: Theorem 1 uses the ladder 6, 12, 24, ... up to it
    seeds: int = 3
    settings: tuple[str, ...] = SETTINGS
    collapse_d: int = 1024  # Monte-Carlo width and tokens for the toy collapse model
    collapse_tokens: int = 64
    force: bool = False  # run even when the memory estimate exceeds what the machine has free

    def depth_ladder(self) -> list[int]:
        top = max(self.depths)
        if len(self.depths) > 1:
            return sorted(set(self.depths))
        return sorted({d for d in LADDER if d < top} | {top})

    def config(self, setting: str, arch: str, placement: str, depth: int, ffn: int | None = None):
        return self.build_config(
            arch=arch, placement=placement, depth=depth, ffn=ffn or self.ffn, init=setting
        )

    def validate(self) -> None:
        if not self.depths or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 2 for d in self.depths
        ):
            raise BoundsError(f"depths: need integers >= 2, got {list(self.depths)}")
        if len(self.depth_ladder()) < 2:
            raise BoundsError(
                f"Theorem 1's slope needs two depths; give --depth >= 7 or a list, got {list(self.depths)}"
            )
        if self.seeds < 1:
            raise BoundsError(f"seeds: must be >= 1, got {self.seeds}")
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad or not self.settings:
            raise BoundsError(
                f"settings: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(SETTINGS)}"
            )
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
                rows.append(
                    {
                        "step": 0,
                        "stack": stack_name,
                        "layer": k,
                        "sublayer": "ffn",
                        "stream": "x",
                        "metric": "final_ln_input_sq_per_dim",
                        "value": float(x.pow(2).mean()),
                    }
                )

            handles.append(blk.ffn.norm.register_forward_pre_hook(hook))
    return handles


def adam_conditions(
    model, lr: float = ADAM_LR, eps: float = ADAM_EPS, rel_step: float = 1e-4
) -> list[dict]:
    """Per block of every stack: gradient RMS, parameter count, and the condition number kappa of
    torch Adam's first update, measured as the finite difference of the update's norm in the
    gradient's scale: (||u((1 + h) g)|| - ||u(g)||) / (h * rms(g)), in float64 (theory.py's
    `adam_update_condition` is its closed form). Metrics `grad_rms`, `grad_absmax`, `param_count`,
    `adam_kappa`."""
    import torch

    rows = []
    for stack_name, stack in model.stacks():
        for blk in stack.layers:
            g = torch.cat(
                [p.grad.detach().double().flatten() for p in blk.parameters() if p.grad is not None]
            )
            norms = []
            for scale in (1.0, 1.0 + rel_step):
                w = torch.zeros_like(g, requires_grad=True)
                opt = torch.optim.Adam([w], lr=lr, eps=eps)
                w.grad = scale * g
                opt.step()
                norms.append(float(w.detach().norm()))
            rms = float(g.pow(2).mean().sqrt())
            kappa = (norms[1] - norms[0]) / (rel_step * rms) if rms > 0 else float("nan")
            for metric, value in (
                ("grad_rms", rms),
                ("grad_absmax", float(g.abs().max())),
                ("param_count", float(g.numel())),
                ("adam_kappa", kappa),
            ):
                rows.append(
                    {
                        "step": 0,
                        "stack": stack_name,
                        "layer": blk.k,
                        "sublayer": "block",
                        "stream": "x",
                        "metric": metric,
                        "value": value,
                    }
                )
    return rows


def measure_bounds(cfg, seed: int, batch: int, seq_len: int, adam: bool = False) -> list[dict]:
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
    probe = Probe(
        model,
        quantities=("param_grad_norm", "w2_grad_norm", "forward_stats", "subsample"),
        seed=seed,
    )
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
            rows.append(
                {
                    "step": 0,
                    "stack": stack,
                    "layer": -1,
                    "sublayer": "embed",
                    "stream": "x",
                    "metric": "embed_norm_sq_per_dim",
                    "value": float(norm_sq_per_dim(sub[0])),
                }
            )
    return rows


def run_bounds(
    spec: BoundsSpec, out: str | Path, formats=("png",), progress=None, echo=None
) -> dict:
    """Measure, check and draw every statement; writes into `out` and returns the JSON sidecar dict.

    `progress(total)` may return a callable advanced once per model run; `echo(line, err=...)` hears
    the memory estimate (budget.require), which refuses a run too big.
    """
    from .. import budget
    from ..analysis import bounds as statements
    from ..analysis.theory import adam_condition_curve
    from ..output import prepare_out, versions, write_csv, write_json
    from ..plots import bounds as plots

    spec.validate()
    budget.require(
        budget.bounds_estimate(spec), spec.force, echo
    )  # before anything is built or written
    out = prepare_out(out)
    ladder, top = spec.depth_ladder(), max(spec.depths)
    # (setting label, init, arch, placement, depth, ffn): "lemma" is Xiong's Lemma 2 in its own
    # setting (Xiong init, square FFN), beside the same statements at the default sizes.
    runs = [
        (s, s, spec.arch, p, d, spec.ffn)
        for s in spec.settings
        for p in XIONG_PLACEMENTS
        for d in ladder
    ]
    if spec.ffn != spec.d_model:
        runs += [("lemma", "xiong", spec.arch, p, top, spec.d_model) for p in XIONG_PLACEMENTS]
    runs += [(s, s, spec.arch, "residual", top, spec.ffn) for s in spec.settings]
    runs += [
        (s, s, "seq2seq", p, top, spec.ffn) for s in spec.settings for p in GRADIENT_PLACEMENTS
    ]
    advance = progress(len(runs) * spec.seeds) if progress else None

    rows, timings, t_all = [], {}, time.perf_counter()
    for setting, init, arch, placement, depth, ffn in runs:
        t0 = time.perf_counter()
        for seed in range(spec.seeds):
            cfg = spec.config(init, arch, placement, depth, ffn)
            adam = arch == "seq2seq" and placement == "post-ln"
            for r in measure_bounds(cfg, seed, spec.batch, spec.seq_len, adam=adam):
                rows.append(
                    {
                        "setting": setting,
                        "arch": arch,
                        "placement": placement,
                        "depth": depth,
                        "seed": seed,
                        **{
                            k: r[k]
                            for k in ("stack", "layer", "sublayer", "stream", "metric", "value")
                        },
                    }
                )
            if advance:
                advance()
        timings[f"{setting}/{arch}/{placement}/{depth}"] = round(time.perf_counter() - t0, 3)
    wall_models = time.perf_counter() - t_all
    runs_done = statements.Runs(
        spec.arch, spec.d_model, spec.ffn, tuple(spec.settings), spec.seeds, tuple(ladder)
    )
    all_checks, figs = [], []
    found, data = statements.check_lemma2(rows, runs_done)
    all_checks += found
    figs += plots.plot_lemma2(data, top, out / "bounds_lemma2", formats)
    found, data = statements.check_theorem1(rows, runs_done)
    all_checks += found
    figs += plots.plot_theorem1(data, out / "bounds_theorem1", formats)
    found, data = statements.check_gradients(rows, runs_done)
    all_checks += found
    figs += plots.plot_residual_gradient(data, out / "bounds_residual_gradient", formats)
    found, toy, models = statements.check_collapse(
        rows, runs_done, spec.collapse_d, spec.collapse_tokens
    )
    all_checks += found
    figs += plots.plot_collapse(toy, models, out / "bounds_collapse", formats)
    found, data = statements.check_adam(rows, runs_done, ADAM_LR, ADAM_EPS)
    all_checks += found
    figs += plots.plot_adam(
        data,
        ADAM_LR,
        ADAM_EPS,
        adam_condition_curve(ADAM_LR, ADAM_EPS),
        out / "bounds_adam",
        formats,
    )

    wall = time.perf_counter() - t_all
    check_rows = [c.to_row() for c in all_checks]
    nonfinite = sum(1 for r in rows if not math.isfinite(r["value"]))
    files = [
        write_csv(out / "bounds.csv", rows, CSV_COLUMNS),
        write_csv(out / "bounds_checks.csv", check_rows, CHECK_COLUMNS),
    ]
    meta = {
        "job": "bounds",
        "spec": asdict(spec),
        "depth_ladder": ladder,
        "seeds": list(range(spec.seeds)),
        "versions": versions(),
        "wall_seconds": round(wall, 3),
        "model_seconds": round(wall_models, 3),
        "run_seconds": timings,
        "nonfinite_values": nonfinite,
        "checks": check_rows,
        "files": [str(p) for p in files + figs],
    }
    meta["files"].append(str(write_json(out / "bounds.json", meta)))
    return meta
