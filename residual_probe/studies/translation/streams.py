"""ResiDual's two streams in a trained model: each stream's gradient and its share of the output.

ResiDual (Xie et al. 2023) keeps a Post-LN stream x and a Pre-LN-like stream d and outputs
alpha * x_N + LN_f(d_N). These measurements say, at one point of training, which stream carries
the gradient to the lower blocks and which term the output relies on.
"""

from __future__ import annotations


def stream_diagnostics(model, batch) -> list[dict]:
    """ResiDual's streams on one held-out batch (eval mode), per stack: rows {stack, layer, quantity, value}.

    - grad_x_total / grad_d_total[k]: RMS over tokens of ||dL/dx_k||, ||dL/dd_k|| at block k's output.
    - grad_x_path[k]: the same for the x stream alone (the Post-LN half): dL/d(alpha x_N) carried back
      through the blocks' x -> x Jacobians only (a vector-Jacobian product per block with the d
      output's cotangent 0), i.e. what the gradient would be if the blocks fed only the x stream.
    - out_rms_x, out_rms_d (layer -1): RMS norm per token of alpha * x_N and LN_f(d_N) in the output.
    - ablate_x, ablate_d (final stack only): held-out loss increase when alpha * x_N (or LN_f(d_N)) is
      replaced by its mean over tokens (mean ablation), in nats per token.
    """
    import torch
    import torch.nn.functional as F

    was = model.training
    model.eval()
    rows = []
    try:
        seq2seq = model.cfg.arch == "seq2seq"
        with torch.enable_grad():
            if seq2seq:
                src, tgt_in = batch.inputs
                enc_states, dec_states = [], []
                enc_out = model.encoder(src, states=enc_states)
                dec_out = model.decoder(tgt_in, memory=enc_out, states=dec_states)
                runs = [
                    ("encoder", model.encoder, enc_states, enc_out, None),
                    ("decoder", model.decoder, dec_states, dec_out, enc_out),
                ]
            else:
                dec_states = []
                dec_out = model.decoder(batch.inputs[0], states=dec_states)
                runs = [("decoder", model.decoder, dec_states, dec_out, None)]
            mask = batch.targets != -100
            logits = model.output_projection(dec_out)
            loss = F.cross_entropy(logits[mask], batch.targets[mask])
            flat = [t for _, _, states, out, _ in runs for s in states[1:] for t in s] + [
                out for *_, out, _ in runs
            ]
            grads = torch.autograd.grad(loss, flat)
        g = iter(grads)
        per_stack = {}
        for name, _stack, states, _out, _ in runs:
            for k in range(len(states) - 1):
                gx, gd = next(g), next(g)
                rows += [
                    dict(stack=name, layer=k, quantity="grad_x_total", value=_rms(gx)),
                    dict(stack=name, layer=k, quantity="grad_d_total", value=_rms(gd)),
                ]
        for (name, stack, states, _out, memory), g_out in zip(runs, g):
            alpha = model.cfg.alpha
            v = alpha * g_out  # dL/dx_N through the alpha * x_N term alone
            for k in range(len(states) - 2, -1, -1):  # block k: states[k] -> states[k + 1]
                rows.append(dict(stack=name, layer=k, quantity="grad_x_path", value=_rms(v)))
                if k == 0:
                    break
                x_in = states[k][0].detach().requires_grad_(True)
                d_in = states[k][1].detach()
                with torch.enable_grad():
                    x_out, _ = stack.layers[k](
                        (x_in, d_in), memory.detach() if memory is not None else None
                    )
                    (v,) = torch.autograd.grad(x_out, x_in, grad_outputs=v)
            x_n, d_n = states[-1]
            with torch.no_grad():
                ax, ld = alpha * x_n, stack.final_norm(d_n)
                rows += [
                    dict(stack=name, layer=-1, quantity="out_rms_x", value=_rms(ax)),
                    dict(stack=name, layer=-1, quantity="out_rms_d", value=_rms(ld)),
                ]
                per_stack[name] = (ax, ld)
        with torch.no_grad():
            ax, ld = per_stack["decoder"]
            base = float(loss)
            for q, h in (
                ("ablate_x", ax.mean(dim=(0, 1), keepdim=True).expand_as(ax) + ld),
                ("ablate_d", ax + ld.mean(dim=(0, 1), keepdim=True).expand_as(ld)),
            ):
                lg = model.output_projection(h)
                rows.append(
                    dict(
                        stack="decoder",
                        layer=-1,
                        quantity=q,
                        value=float(F.cross_entropy(lg[mask], batch.targets[mask])) - base,
                    )
                )
    finally:
        model.train(was)
    return rows


def _rms(t) -> float:
    """RMS over tokens of the per-token L2 norm of t (..., d)."""
    return float(t.detach().double().pow(2).sum(-1).mean().sqrt())


def stream_summary(rows: list[dict], stack: str = "decoder") -> dict[int, dict[str, float]]:
    """Per measured step: x-path and d-stream gradient block 0 / last block, output RMS and ablations."""
    import math
    from collections import defaultdict

    q: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["stack"] == stack:
            q[r["quantity"]][int(r["step"])][int(r["layer"])] = float(r["value"])
    out = {}
    for step in sorted(q["grad_x_path"]):
        xp, dt, xt = q["grad_x_path"][step], q["grad_d_total"][step], q["grad_x_total"][step]
        top = max(xp)
        out[step] = dict(
            x_path_first_last=xp[0] / xp[top],
            d_total_first_last=dt[0] / dt[top],
            x_total_first_last=xt[0] / xt[top],
            x_path_first_over_d=xp[0] / dt[0],
            out_rms_x=q["out_rms_x"][step][-1],
            out_rms_d=q["out_rms_d"][step][-1],
            ablate_x=q["ablate_x"][step].get(-1, math.nan),
            ablate_d=q["ablate_d"][step].get(-1, math.nan),
        )
    return out
