"""The translation study: its task, its held-out split, the stream measurements against a naive
twin, and the quick grid end to end (tables, figures, checks, resuming)."""

import csv
import dataclasses
import json
import math

import pytest
import torch

from residual_probe.studies import translation as T


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
        assert t[-1] == T.EOS and [data.vocab[j] for j in t[:-1]] == T.target_tokens(" ".join(words))
        assert tgt_in[i, 1 : len(t)].tolist() == t[:-1]
        # every word changes (punctuation is kept): no target word copies its source word
        assert all(s != j for s, j in zip(src[i].tolist(), t) if data.vocab[s].isalpha())


def test_schedule_warmup_and_no_warmup_differ_only_in_the_ramp():
    w = T.RunSpec("translation", "pre-ln", 2, True, lr=1e-3, warmup_steps=10)
    n = T.RunSpec("translation", "pre-ln", 2, False, lr=1e-3, warmup_steps=10)
    assert T.lr_at(0, w) == pytest.approx(1e-4) and T.lr_at(0, n) == pytest.approx(1e-3)
    for step in range(9, 60):
        assert T.lr_at(step, w) == T.lr_at(step, n) == pytest.approx(1e-3 * math.sqrt(10 / (step + 1)))


def test_bleu_scorer():
    refs = ["ethay atcay atsay onway ethay atmay", "away ogday anray otay emay!"]
    assert T.corpus_bleu(refs, refs) == pytest.approx(100.0)
    assert T.corpus_bleu(["xx yy zz ww vv uu", "qq rr ss tt oo pp"], refs) < 1.0
    half = T.corpus_bleu(["ethay atcay atsay onway ethay atmay", "xx yy zz ww vv uu"], refs)
    assert 10 < half < 90


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
    loss = torch.nn.functional.cross_entropy(model.output_projection(out)[mask], batch.targets[mask])
    loss.backward()
    return [float(t.grad.pow(2).sum(-1).mean().sqrt()) for t in xs], float(loss.detach())


def test_x_path_gradient_equals_naive_twin():
    torch.manual_seed(0)
    spec = T.RunSpec("translation", "residual", 3, True, d_model=16, heads=2, ffn=32, dropout=0.0,
                     attention_dropout=0.0, activation_dropout=0.0)
    model = spec.build_model().double().eval()
    batch = T.PigLatinBatches(T.task_data(), 4, seed=1).next()
    rows = T.stream_diagnostics(model, batch)
    got = {r["layer"]: r["value"] for r in rows if r["stack"] == "decoder" and r["quantity"] == "grad_x_path"}
    want, _ = _x_path_twin(model, batch)
    assert sorted(got) == [0, 1, 2]
    for k in range(3):
        assert got[k] == pytest.approx(want[k], rel=1e-9)
    # the d stream's total gradient is the same at every block (d_{k+1} = d_k + b_k), by construction
    d = [r["value"] for r in rows if r["stack"] == "decoder" and r["quantity"] == "grad_d_total"]
    assert max(d) == pytest.approx(min(d), rel=1e-9)
    # mean-ablating a term of the output changes the loss by a finite amount
    abl = {r["quantity"]: r["value"] for r in rows if r["quantity"].startswith("ablate")}
    assert set(abl) == {"ablate_x", "ablate_d"} and all(math.isfinite(v) for v in abl.values())


def test_greedy_decode_returns_text():
    torch.manual_seed(0)
    spec = T.RunSpec("translation", "pre-ln", 1, True, d_model=16, heads=2, ffn=32)
    model = spec.build_model().eval()
    data = T.task_data()
    src = T.encode_pairs(["the value is true .", "a list of the names"], data)[0]
    outs = T.greedy_decode(model, src, max_new=7)
    assert len(outs) == 2 and all(len(o) <= 7 and all(3 <= t < len(data.vocab) for t in o) for o in outs)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("translation")
    checks = T.run(out, quick=True, echo=lambda line: None)
    return out, checks


def test_quick_grid_writes_tables_figures_and_checks(quick):
    out, checks = quick
    table = list(csv.DictReader(open(out / "translation_table.csv")))
    assert len(table) == 12  # 2 depths x 3 placements x warm-up or not
    assert {r["placement"] for r in table} == set(T.PLACEMENTS)
    runs = list(csv.DictReader(open(out / "translation_runs.csv")))
    assert len(runs) == 12 and all(0 <= float(r["bleu"]) <= 100 for r in runs)
    for name in ("bleu", "curves", "grads", "collapse", "streams"):
        assert (out / f"translation_{name}.png").stat().st_size > 20_000, name
    assert {c.agreement for c in checks} <= {"yes", "no"}
    statements = [c.statement for c in checks]
    assert any(s.startswith("ResiDual >= Pre-LN and Post-LN") for s in statements)
    assert sum(s.startswith("Without warm-up ResiDual loses less") for s in statements) == 2
    assert any("x stream" in s for s in statements)
    assert any(s.startswith("ResiDual without its alpha*x output term") for s in statements)  # the ablation
    meta = json.loads((out / "translation.json").read_text())
    assert meta["missing_runs"] == [] and meta["units"]["heldout"] > 200


def test_quick_grid_resumes_and_writes_a_partial_grid(quick):
    out, checks = quick
    root = out / "runs" / "translation-quick"
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("*/result.json")}
    assert len(stamps) == 17  # 12 translation cells + the alpha = 0 ablation + 4 LMs
    again = T.run(out, quick=True, echo=lambda line: None)  # every run finished: nothing retrains
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/result.json")} == stamps
    assert [c.measured for c in again] == [c.measured for c in checks]
    (root / T.run_name("translation", "post-ln", 2, False) / "result.json").unlink()
    lines = []
    partial = T.run(out, quick=True, echo=lines.append, train=False)
    assert any("1 of 17 runs not finished" in line for line in lines)
    assert len(list(csv.DictReader(open(out / "translation_runs.csv")))) == 11
    assert len(partial) == len(checks)


def test_a_result_saved_before_a_field_was_added_still_resumes():
    spec = T.RunSpec("translation", "residual", 1, True, d_model=16, heads=2, ffn=32, steps=20)
    saved = dataclasses.asdict(spec)
    del saved["alpha"]  # written before RunSpec had alpha
    assert T.same_spec(saved, spec)
    assert not T.same_spec(saved, dataclasses.replace(spec, alpha=0.0))
    assert dataclasses.replace(spec, alpha=0.0).name.endswith("-alpha0") and not spec.name.endswith("alpha1")
