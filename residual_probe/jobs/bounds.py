"""The `bounds` job: every theory statement against measurement on the reference models at init.

Runs (each seeded, one forward/backward at initialization through the probe):
- Xiong's statements (Lemma 2, Theorem 1) and the collapse shape on `arch` (default encoder:
  bidirectional self-attention + FFN per block, the lemma's setting), Post-LN and Pre-LN at every
  depth of the ladder, ResiDual at the largest depth;
- ResiDual's gradient statements on seq2seq (where DESIGN.md says Post-LN's vanishing shows:
  the decoder), Post-LN, Pre-LN and ResiDual at the largest depth;
each in Xiong's setting (W^Q = W^K = 0) and with the default (fairseq) initialization.
The collapse closed forms are checked by Monte-Carlo; the Adam statement with torch's Adam.

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
    extra: dict = field(default_factory=dict)

    def depth_ladder(self) -> list[int]:
        top = max(self.depths)
        if len(self.depths) > 1:
            return sorted(set(self.depths))
        return sorted({d for d in LADDER if d < top} | {top})

    def config(self, setting: str, arch: str, placement: str, depth: int):
        from ..models import ModelConfig

        return ModelConfig(arch=arch, placement=placement, depth=depth, d_model=self.d_model, heads=self.heads,
                           ffn=self.ffn, init=setting, max_len=max(1024, self.seq_len), **self.extra)

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


def measure(cfg, seed: int, batch: int, seq_len: int) -> list[dict]:
    """One forward/backward at initialization, recorded by the probe: its rows, plus the embedding's
    E||x_0||^2/d per stack (metric `embed_norm_sq_per_dim`, layer -1) from the token subsample."""
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
    with probe:
        Trainer(model, probe).step(b, update=False)
    rows = [r for r in probe.rows() if r["metric"] != "nonfinite_count"]
    for (stack, stream), sub in probe.subsamples().items():
        if stream == "x":
            rows.append({"step": 0, "stack": stack, "layer": -1, "sublayer": "embed", "stream": "x",
                         "metric": "embed_norm_sq_per_dim", "value": float(norm_sq_per_dim(sub[0]))})
    return rows


def measure_adam(g_healthy: float, g_small, eps: float = 1e-8, steps: int = 3000, seed: int = 0):
    """Adam's effective step lr/(sqrt(v_hat)+eps) of a coordinate with gradient RMS g_small over one
    with RMS g_healthy, after `steps` stationary Gaussian gradients (torch.optim.Adam, beta2 0.999:
    v_hat then averages ~1000 squared samples, so each RMS scatters by ~2 %)."""
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([g_healthy, *g_small], dtype=torch.float64)
    w = torch.zeros_like(scale, requires_grad=True)
    opt = torch.optim.Adam([w], lr=1.0, betas=(0.9, 0.999), eps=eps)
    for _ in range(steps):
        w.grad = scale * torch.randn(scale.shape, generator=g, dtype=torch.float64)
        opt.step()
    v_hat = opt.state[w]["exp_avg_sq"] / (1 - 0.999**steps)
    step = 1.0 / (v_hat.sqrt() + eps)
    return np.asarray((step[1:] / step[0]).tolist())


def _select(rows, **where):
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def _table(rows, seeds: int, n_layers: int):
    """(seeds, layers) array of values from rows with seed and layer keys."""
    import numpy as np

    out = np.full((seeds, n_layers), np.nan)
    for r in rows:
        out[r["seed"], r["layer"]] = r["value"]
    return out


def run_bounds(spec: BoundsSpec, out: str | Path, formats=("png",), progress=None) -> dict:
    """Measure, check and draw every statement; writes into `out` and returns the JSON sidecar dict.

    `progress(total)` may return a callable advanced once per model run.
    """
    import numpy as np

    from ..analysis import checks, theory
    from ..analysis import metrics as M
    from ..analysis.collapse import inverse_sqrt_reference
    from ..analysis.summary import band
    from ..output import prepare_out, versions, write_csv, write_json
    from ..plots import bounds as plots

    spec.validate()
    out = prepare_out(out)
    ladder, top = spec.depth_ladder(), max(spec.depths)
    runs = [(s, spec.arch, p, d) for s in spec.settings for p in XIONG_PLACEMENTS for d in ladder]
    runs += [(s, spec.arch, "residual", top) for s in spec.settings]
    runs += [(s, "seq2seq", p, top) for s in spec.settings for p in GRADIENT_PLACEMENTS]
    advance = progress(len(runs) * spec.seeds) if progress else None

    rows, timings, t_all = [], {}, time.perf_counter()
    for setting, arch, placement, depth in runs:
        t0 = time.perf_counter()
        for seed in range(spec.seeds):
            cfg = spec.config(setting, arch, placement, depth)
            for r in measure(cfg, seed, spec.batch, spec.seq_len):
                rows.append({"setting": setting, "arch": arch, "placement": placement, "depth": depth, "seed": seed,
                             **{k: r[k] for k in ("stack", "layer", "sublayer", "stream", "metric", "value")}})
            if advance:
                advance()
        timings[f"{setting}/{arch}/{placement}/{depth}"] = round(time.perf_counter() - t0, 3)
    wall_models = time.perf_counter() - t_all
    S = spec.seeds
    xstack = "encoder" if spec.arch == "encoder" else "decoder"
    all_checks, figs = [], []

    # Xiong Lemma 2: block-output norms at the largest depth
    lemma = {}
    for setting in spec.settings:
        for p in XIONG_PLACEMENTS:
            sel = dict(setting=setting, arch=spec.arch, placement=p, depth=top, stack=xstack, stream="x")
            norm_sq = _table(_select(rows, metric="norm_sq_per_dim", **sel), S, top)
            v0 = float(np.mean([r["value"] for r in _select(rows, metric="embed_norm_sq_per_dim", **sel)]))
            all_checks.append(checks.lemma2(f"{setting}/{spec.arch}", p, norm_sq, v0))
            l = np.arange(1, top + 1)
            curve = theory.xiong_lemma2_preln_band(l, v0) if p == "pre-ln" else theory.xiong_lemma2_postln(l)
            lemma[(setting, p)] = {"mean": norm_sq.mean(0), "theory": curve}
    figs += plots.plot_lemma2(lemma, top, out / "bounds_lemma2", formats)

    # Xiong Theorem 1: last block's W2 gradient against depth
    thm = {}
    for setting in spec.settings:
        for p in XIONG_PLACEMENTS:
            w2 = np.array([[_select(rows, setting=setting, arch=spec.arch, placement=p, depth=d, seed=s, stack=xstack,
                                    metric="w2_grad_norm")[0]["value"] for d in ladder] for s in range(S)])
            check, data = checks.theorem1(f"{setting}/{spec.arch}", p, ladder, w2)
            all_checks.append(check)
            thm[(setting, p)] = {**data, "band": band(w2)}
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
                grad[(setting, stack, p)] = {**data, "band": band(g)}
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
            all_checks.append(checks.collapse_model(f"{setting}/{spec.arch}", p, lnu))
            model_lnu[(setting, p)] = {"band": band(lnu), "reference": inverse_sqrt_reference(lnu.mean(0))}
    figs += plots.plot_collapse(toy, model_lnu, out / "bounds_collapse", formats)

    # ResiDual's Adam argument
    eps, g_healthy = 1e-8, 1e-2
    g_small = np.logspace(-14, -3, 12)
    ratio = measure_adam(g_healthy, g_small, eps)
    all_checks.append(checks.adam(g_healthy, g_small, ratio, eps))
    figs += plots.plot_adam(g_healthy, g_small, ratio, theory.adam_step_ratio(g_healthy, g_small, eps), eps,
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
