"""The translation study: its task, its held-out split, the stream measurements against a naive
twin, the regime rules, the significance rule, and the quick grid end to end (tables, figures,
checks, resuming)."""

import csv
import dataclasses
import json
import math

import pytest
import torch

from residual_probe.analysis import regime, significance
from residual_probe.models import Transformer
from residual_probe.studies.translation import runs as R
from residual_probe.studies.translation import task as T
from residual_probe.studies.translation.streams import stream_diagnostics
from residual_probe.training import lr_schedule


def test_pig_latin_rules():
    assert T.pig_latin_word("the") == "ethay"
    assert T.pig_latin_word("string") == "ingstray"
    assert T.pig_latin_word("apple") == "appleway"
    assert T.pig_latin_word("queen") == "eenquay"  # "qu" is one onset
    assert T.pig_latin_word("rhythm") == "ythmrhay"  # a non-initial y is a vowel
    assert T.pig_latin_word("yes") == "esyay"  # an initial y is a consonant
    assert T.pig_latin_word("tcp") == "tcpay"  # no vowel: all onset
    assert T.pig_latin("the cat, 2 sat (on it).") == "ethay atcay, 2 atsay (onway itway)."


def test_units_and_heldout_split():
    data = T.task_data()
    train = {u for units in data.train.values() for u in units}
    assert len(train) > 3000 and len(data.heldout) > 200
    assert not train & set(data.heldout)  # held-out units never seen in training
    assert data.sentences[1] > 50 and data.sentences[0] > 8 * data.sentences[1]
    assert all(12 <= len(u) <= 32 and u == u.lower() for u in list(train)[:500] + data.heldout)
    for n, units in data.train.items():
        assert all(len(T.tokens(u)) == n for u in units)
    # every held-out word and its Pig Latin are in the dictionary, built from training units only
    assert all(t in data.index for u in data.heldout for t in T.tokens(u) + T.target_tokens(u))
    assert data.vocab[:3] == ["<s>", "</s>", "<pad>"] and len(set(data.vocab)) == len(data.vocab)
    # the held-out sentences are chosen by a hash of the sentence, not by position: the split is stable
    T.task_data.cache_clear()
    assert T.task_data().heldout == data.heldout


def test_batches_teacher_forcing():
    data = T.task_data()
    b = T.PigLatinBatches(data, 6, seed=3).next()
    src, tgt_in = b.inputs
    assert src.shape[0] == 6 and tgt_in.shape == b.targets.shape
    assert bool((tgt_in[:, 0] == T.BOS).all())
    for i in range(6):
        words = [data.vocab[t] for t in src[i].tolist()]
        t = b.targets[i][b.targets[i] != -100].tolist()
        assert t[-1] == T.EOS and [data.vocab[j] for j in t[:-1]] == T.target_tokens(
            " ".join(words)
        )
        assert tgt_in[i, 1 : len(t)].tolist() == t[:-1]
        # every word changes (punctuation is kept): no target word copies its source word
        assert all(s != j for s, j in zip(src[i].tolist(), t) if data.vocab[s].isalpha())


def test_schedule_warmup_and_no_warmup_differ_only_in_the_ramp():
    assert (
        lr_schedule(0, 1e-3, 10) == pytest.approx(1e-4)
        and lr_schedule(0, 1e-3, 10, ramp=False) == 1e-3
    )
    for step in range(9, 60):
        assert (
            lr_schedule(step, 1e-3, 10)
            == lr_schedule(step, 1e-3, 10, ramp=False)
            == pytest.approx(1e-3 * math.sqrt(10 / (step + 1)))
        )
    assert lr_schedule(50, 1e-3, 10, decay="constant") == 1e-3
    with pytest.raises(ValueError, match="unknown decay"):
        lr_schedule(0, 1e-3, 10, decay="cosine")


def test_bleu_scorer_and_translate():
    refs = ["ethay atcay atsay onway ethay atmay", "away ogday anray otay emay!"]
    assert T.corpus_bleu(refs, refs) == pytest.approx(100.0)
    assert T.corpus_bleu(["xx yy zz ww vv uu", "qq rr ss tt oo pp"], refs) < 1.0
    torch.manual_seed(0)
    model = Transformer(
        R.RunSpec("pre-ln", 1, True, d_model=16, heads=2, ffn=32).model_config()
    ).eval()
    data = T.task_data()
    units = data.heldout[:5] + data.heldout[-3:]  # two source lengths at least
    hyps = T.translate(model, units, data)
    # in the units' order, whatever batch each went to: a unit alone decodes the same
    assert hyps[-1] == T.translate(model, units[-1:], data)[0] and len(hyps) == len(units)


def _x_path_twin(model, batch):
    """Naive twin of grad_x_path on the decoder: the ResiDual forward written out with every branch's
    contribution to d detached, so that dL/dx_k counts only paths along the x stream."""
    src, tgt_in = batch.inputs
    memory = model.encoder(src)
    dec = model.decoder
    x = dec.embed(tgt_in)
    d = x.detach()
    xs = []
    for blk in dec.layers:
        for sub, mem in ((blk.self_attn, None), (blk.cross_attn, memory), (blk.ffn, None)):
            b = sub(x, mem)
            x, d = sub.norm(x + b), d + b.detach()
        x.retain_grad()
        xs.append(x)
    out = model.cfg.alpha * x + dec.final_norm(d)
    mask = batch.targets != -100
    loss = torch.nn.functional.cross_entropy(
        model.output_projection(out)[mask], batch.targets[mask]
    )
    loss.backward()
    return [float(t.grad.pow(2).sum(-1).mean().sqrt()) for t in xs], float(loss.detach())


def test_x_path_gradient_equals_naive_twin():
    torch.manual_seed(0)
    spec = R.RunSpec(
        "residual",
        3,
        True,
        d_model=16,
        heads=2,
        ffn=32,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    model = Transformer(spec.model_config()).double().eval()
    batch = T.PigLatinBatches(T.task_data(), 4, seed=1).next()
    rows = stream_diagnostics(model, batch)
    got = {
        r["layer"]: r["value"]
        for r in rows
        if r["stack"] == "decoder" and r["quantity"] == "grad_x_path"
    }
    want, _ = _x_path_twin(model, batch)
    assert sorted(got) == [0, 1, 2]
    for k in range(3):
        assert got[k] == pytest.approx(want[k], rel=1e-9)
    # the d stream's total gradient is the same at every block (d_{k+1} = d_k + b_k), by construction
    d = [r["value"] for r in rows if r["stack"] == "decoder" and r["quantity"] == "grad_d_total"]
    assert max(d) == pytest.approx(min(d), rel=1e-9)
    abl = {r["quantity"]: r["value"] for r in rows if r["quantity"].startswith("ablate")}
    assert set(abl) == {"ablate_x", "ablate_d"} and all(math.isfinite(v) for v in abl.values())


def test_stack_states_are_the_block_inputs():
    torch.manual_seed(0)
    model = Transformer(
        R.RunSpec("pre-ln", 2, True, d_model=16, heads=2, ffn=32).model_config()
    ).eval()
    src = torch.randint(3, 50, (2, 5))
    states = []
    out = model.encoder(src, states=states)
    assert len(states) == 3 and torch.equal(model.encoder.layers[1](states[1]), states[2])
    assert torch.equal(out, model.encoder(src))  # collecting states changes nothing


def test_convergence_rule_and_gate():
    flat = [dict(step=s, heldout_loss=1.0 - 0.001 * s / 100) for s in range(0, 3001, 100)]
    # each end the mean of 5 evaluations: steps 2000-2400 and 2600-3000
    assert regime.tail_improvement(flat) == pytest.approx((0.978 - 0.972) / 0.978)
    assert regime.converged(flat)
    falling = [dict(step=s, heldout_loss=2.0 - 0.03 * s / 100) for s in range(0, 3001, 100)]
    assert not regime.converged(falling)
    assert (
        regime.gate_passes(31.0, 35.0)
        and not regime.gate_passes(29.0, 35.0)
        and regime.gate_passes(40, 35)
    )
    lr, why = regime.choose_lr(
        {1e-3: {"post-ln": 70, "pre-ln": 72}, 2e-3: {"post-ln": 60, "pre-ln": 72}}
    )
    assert lr == 1e-3 and "largest lr" in why  # 2e-3 fails the gate: 12 BLEU apart
    lr, why = regime.choose_lr(
        {1e-3: {"post-ln": 10, "pre-ln": 72}, 2e-3: {"post-ln": 20, "pre-ln": 72}}
    )
    assert lr == 2e-3 and "no lr passes" in why


def test_significance_rule():
    refs = [
        f"ethay atcay {w} atsay onway" for w in ("away", "ogday", "emay", "itway", "usay", "ouyay")
    ] * 20
    good = list(refs)
    bad = [r.replace("atsay", "xx").replace("onway", "yy") for r in refs]
    p = significance.paired_bleu(good, bad, refs)
    assert p.diff > 50 and p.p_value < 0.01
    assert significance.resolve([p, p]) == "yes"
    q = significance.paired_bleu(bad, good, refs)
    assert significance.resolve([q, q]) == "no"
    assert significance.resolve([p, q]) == "not resolved"  # the seeds disagree
    same = significance.paired_bleu(good, good, refs)
    assert same.diff == 0 and significance.resolve([same]) == "not resolved"
    assert "per seed" in significance.describe([p, q])


def _clustered(seed: int = 0, sentences: int = 40, per: int = 4):
    """A seeded test set whose units come in sentences of `per` clauses; A and B each get a whole
    sentence right or wrong (quality is a sentence property), as a model that misreads a sentence."""
    import random

    rng = random.Random(seed)
    words = ["ethay", "atcay", "ogday", "itway", "usay", "ouyay", "emay", "away", "onway", "atsay"]
    refs, a, b, clusters = [], [], [], []
    for s in range(sentences):
        ok_a, ok_b = rng.random() < 0.6, rng.random() < 0.5
        for _ in range(per):
            ref = " ".join(rng.choices(words, k=6))
            bad = " ".join(rng.choices(words, k=6))
            refs.append(ref)
            a.append(ref if ok_a else bad)
            b.append(ref if ok_b else bad)
            clusters.append(s)
    return a, b, refs, clusters


def test_cluster_bootstrap_matches_a_direct_computation():
    """The interval from summed sentence statistics equals resampling the text itself: each
    resample's units scored by sacrebleu's corpus BLEU, with the same seeded draws."""
    import numpy as np
    import sacrebleu

    a, b, refs, clusters = _clustered(sentences=12, per=3)
    got = significance.cluster_bootstrap(a, b, refs, clusters, n_samples=50, seed=7)
    full = sacrebleu.corpus_bleu(a, [refs]).score - sacrebleu.corpus_bleu(b, [refs]).score
    assert got.diff == pytest.approx(full, abs=1e-9) and (got.clusters, got.units) == (12, 36)
    counts = significance.resample_counts(12, 50, seed=7)
    direct = []
    for c in counts:
        pick = [i for k in range(12) for _ in range(c[k]) for i in range(36) if clusters[i] == k]
        ref = [[refs[i] for i in pick]]
        direct.append(
            sacrebleu.corpus_bleu([a[i] for i in pick], ref).score
            - sacrebleu.corpus_bleu([b[i] for i in pick], ref).score
        )
    low, high = np.quantile(direct, [0.025, 0.975])
    assert (got.low, got.high) == pytest.approx((low, high), abs=1e-9)
    assert got.low <= got.diff <= got.high


def test_cluster_bootstrap_is_wider_than_resampling_units_on_clustered_data():
    """Units of one sentence move together: treating them as independent understates the spread."""
    a, b, refs, clusters = _clustered()
    by_sentence = significance.cluster_bootstrap(a, b, refs, clusters)
    by_unit = significance.cluster_bootstrap(a, b, refs, list(range(len(refs))))
    assert by_sentence.diff == by_unit.diff and by_sentence.clusters == 40
    assert (by_sentence.high - by_sentence.low) > 1.5 * (by_unit.high - by_unit.low)
    with pytest.raises(ValueError, match="equally long"):
        significance.cluster_bootstrap(a, b[:-1], refs, clusters)


def test_quick_grid_writes_tables_figures_and_checks(quick_figures):
    out, meta = quick_figures
    table = list(csv.DictReader(open(out / "translation_table.csv")))
    # at the main lr, to the rule: both depths with warm-up (Post-LN, Pre-LN, ResiDual), Pre-LN and
    # ResiDual at both depths without, the ablation; the calibration runs have their own table
    assert len(table) == 3 + 3 + 2 + 2 + 1
    runs = list(csv.DictReader(open(out / "translation_runs.csv")))
    assert len(runs) == 11 and all(0 <= float(r["bleu"]) <= 100 for r in runs)
    assert all(r["run"].endswith("-to-rule") and int(r["steps_done"]) in (10, 15, 20) for r in runs)
    cal = list(csv.DictReader(open(out / "translation_calibration.csv")))
    assert {(r["placement"], float(r["lr"])) for r in cal} == {
        (p, lr) for p in ("post-ln", "pre-ln") for lr in R.LRS
    }
    for name in ("bleu", "bleu_curves", "curves", "grads", "collapse", "streams"):
        assert (out / f"translation_{name}.png").stat().st_size > 20_000, name
    checks = [c for c in meta["checks"] if c["study"] == "translation"]
    assert {c["agreement"] for c in checks} <= {"yes", "no", "not resolved"}
    statements = [c["statement"] for c in checks]
    assert any(s.startswith("Gate: Post-LN") for s in statements)
    # the gate (within 5 BLEU) and "as good as Pre-LN" (the paired test) are separate rows
    assert any(s.startswith("Post-LN E1D1 with warm-up is as good as Pre-LN") for s in statements)
    lr_row = next(c for c in checks if c["statement"].startswith("Some peak lr"))
    assert any(w in lr_row["measured"] for w in ("rule bound", "did not bind")) or (
        lr_row["agreement"] == "no"
    )
    assert any(s.startswith("The claim runs level off within the cap") for s in statements)
    assert sum(s.startswith("ResiDual > Pre-LN at E1D1 (warm-up, lr") for s in statements) == 1
    assert any("alpha 1 > alpha 0" in s for s in statements)
    meta_t = json.loads((out / "translation.json").read_text())
    assert (
        meta_t["missing_runs"] == []
        and meta_t["units"]["heldout"] > 200
        and meta_t["main_lr"] in R.LRS
    )
    # the final decodes of every run, with each unit's sentence: a sentence bootstrap needs them
    import gzip

    with gzip.open(out / "translation_hypotheses.csv.gz", "rt") as fh:
        hyps = list(csv.DictReader(fh))
    assert len(hyps) == 11 * meta_t["units"]["heldout"]
    # sentences whose every unit was dropped (an unseen word) have none
    assert 50 < len({h["sentence"] for h in hyps}) <= meta_t["sentences"]["heldout"]
    # every comparison row gives its per-seed sentence interval (the sentences are known)
    assert all(
        "sentence-bootstrap interval" in c["measured"]
        for c in checks
        if c["statement"].startswith("ResiDual >")
    )
    # failure against the bigram, the old rule beside it, the shuffled-source control logged
    assert meta_t["bigram_loss"] < meta_t["unigram_loss"]
    assert all(r["failed_bleu_rule"] in ("yes", "no") for r in runs)
    assert all(math.isfinite(float(r["shuffled_loss"])) for r in runs)
    curves = list(csv.DictReader(open(out / "translation_curves.csv")))
    assert all(math.isfinite(float(r["shuffled_loss"])) for r in curves)
    fail_row = next(c for c in checks if c["statement"].startswith("Post-LN fails to train"))
    assert "bigram" in fail_row["measured"] and "old rule" in fail_row["measured"]


def test_quick_grid_resumes_and_writes_a_partial_grid(quick_figures, tmp_path, monkeypatch):
    import shutil

    from residual_probe.studies import translation

    src, meta = quick_figures
    shutil.copytree(src / "runs", tmp_path / "runs")  # a copy: the shared fixture stays whole
    root = tmp_path / "runs" / "translation-quick"
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("*/result.json")}
    assert len(stamps) == 15
    with (
        monkeypatch.context() as m
    ):  # the resume alone: the tables and figures are the partial run's
        m.setattr(translation, "write_results", lambda *args, **kwargs: [])
        translation.run(
            tmp_path, quick=True, echo=lambda line: None
        )  # all finished: nothing retrains
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/result.json")} == stamps
    lr = json.loads((src / "translation.json").read_text())["main_lr"]
    gone = R.RunSpec("pre-ln", 2, False, lr=lr, **{**R.common(True), **R.to_convergence(True)})
    (root / gone.name / "result.json").unlink()
    lines = []
    partial = translation.run(tmp_path, quick=True, echo=lines.append, train=False)
    assert any("1 of 15 runs not finished" in line for line in lines)
    assert len(list(csv.DictReader(open(tmp_path / "translation_runs.csv")))) == 10
    assert len(partial) == len([c for c in meta["checks"] if c["study"] == "translation"])
    # the wall time of the training calls (the fixture's and the resume), though this write trained none
    written = json.loads((tmp_path / "translation.json").read_text())
    assert len(written["wall_calls"]) == 2 and written["wall_seconds"] > 0


def test_a_result_with_another_spec_is_not_reused():
    spec = R.RunSpec("residual", 1, True, d_model=16, heads=2, ffn=32, steps=20)
    saved = dataclasses.asdict(spec)
    assert R.same_spec(saved, spec)
    assert not R.same_spec(saved, dataclasses.replace(spec, alpha=0.0))
    assert dataclasses.replace(spec, alpha=0.0).name.endswith("-alpha0") and not spec.name.endswith(
        "alpha1"
    )
