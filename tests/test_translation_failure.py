"""The translation study's failure rule and its bars (the source-blind bigram loss, the
shuffled-source control), and the sentence intervals in its comparison rows, on hand-made data."""

import math

import pytest
import torch

from residual_probe.analysis import significance
from residual_probe.models import Transformer
from residual_probe.studies.translation import checks as C
from residual_probe.studies.translation import runs as R
from residual_probe.studies.translation import task as T
from residual_probe.training import score_batches


def _tiny_task(heldout):
    """Two training units ("the cat", "the dog") and the given held-out units, one dictionary."""
    train = {2: ["the cat", "the dog"]}
    words = {"the", "cat", "dog"}
    vocab = list(T.SPECIALS) + sorted(words | {T.pig_latin_word(w) for w in words})
    return T.TaskData(train, heldout, (2, 1), vocab)


def test_bigram_loss_by_hand():
    """Witten-Bell on the training targets "ethay atcay </s>" and "ethay ogday </s>".

    Add-one unigram over the 9-token dictionary: counts 1 + (ethay 2, atcay 1, ogday 1, </s> 2),
    total 15. Contexts (count c, distinct followers k): <s> (2, 1) -> ethay; ethay (2, 2) -> atcay,
    ogday; atcay (1, 1) and ogday (1, 1) -> </s>. P(b | a) = (c(a, b) + k P(b)) / (c + k)."""
    data = _tiny_task(["the cat", "cat the"])
    assert T.unigram_probs(data)[data.index["ethay"]] == pytest.approx(3 / 15)
    seen = [(2 + 3 / 15) / 3, (1 + 2 * 2 / 15) / 4, (1 + 3 / 15) / 2]  # the cat </s>
    unseen = [(1 * 2 / 15) / 3, (1 * 3 / 15) / 2, (2 * 3 / 15) / 4]  # cat the </s>: no pair seen
    want = -sum(math.log(p) for p in seen + unseen) / 6  # every token once, pooled over units
    assert T.bigram_loss(data) == pytest.approx(want, rel=1e-12)
    # one held-out unit: the same sum over its own 3 tokens
    assert T.bigram_loss(_tiny_task(["the cat"])) == pytest.approx(
        -sum(map(math.log, seen)) / 3, rel=1e-12
    )


def test_bigram_is_below_the_unigram_on_the_task():
    data = T.task_data()
    assert T.bigram_loss(data) < T.unigram_loss(data) - 0.5


def test_derangement_has_no_fixed_point():
    for n in (2, 3, 7, 50):
        for seed in range(20):
            perm = T.derangement(n, seed)
            assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))
    assert T.derangement(2, 0) == [1, 0]
    assert T.derangement(30, 4) == T.derangement(30, 4)  # seeded
    with pytest.raises(ValueError, match="at least 2"):
        T.derangement(1, 0)


def test_shuffled_source_loss_scores_exactly_the_permuted_pairs():
    data = T.task_data()
    lengths = sorted({len(T.tokens(u)) for u in data.heldout})
    units = [next(u for u in data.heldout if len(T.tokens(u)) == n) for n in lengths[:3]]
    units += data.heldout[:9]  # three source lengths at least, batches of up to 4
    batches = T.heldout_batches(units, data, 4)
    pairs = T.unit_pairs(batches)
    assert sorted(p[1] for p in pairs) == sorted(T.target_ids(units, data))
    torch.manual_seed(0)
    spec = R.RunSpec("pre-ln", 1, True, d_model=16, heads=2, ffn=32)
    model = Transformer(spec.model_config())
    shuffled, perm = T.shuffled_source_batches(batches, seed=3, batch=4)
    assert all(j != i for i, j in enumerate(perm))
    # every unit's target exactly once, each with the source the permutation gives it
    got = sorted(
        (b.inputs[0][i].tolist(), *_target(b, i))
        for b in shuffled
        for i in range(b.targets.shape[0])
    )
    want = sorted((pairs[perm[i]][0], *pairs[i][1:]) for i in range(len(pairs)))
    assert got == want
    # the loss: each permuted pair scored alone, tokens pooled
    total = n = 0.0
    for i, j in enumerate(perm):
        src, tgt_in, targets = T.pad_pairs([pairs[j][0]], [pairs[i][1]])
        loss, _ = score_batches(model, [_batch(src, tgt_in, targets)])
        total, n = total + loss * len(pairs[i][1]), n + len(pairs[i][1])
    assert T.shuffled_source_loss(model, batches, seed=3) == pytest.approx(total / n, rel=1e-5)
    assert model.training  # scoring leaves the mode as it was
    # with its own sources the same scorer gives the study's held-out loss, not the control
    own = score_batches(model, batches)[0]
    assert own != pytest.approx(total / n, rel=1e-6)


def _target(b, i):
    t = b.targets[i]
    return (t[t != -100].tolist(),)


def _batch(*tensors):
    from residual_probe.data import Batch

    return Batch(tensors[:2], tensors[2])


def _result(placement, seed, loss, bleu, hyps, depth=2, lr=1e-3, shuffled=math.nan):
    spec = R.RunSpec(placement, depth, True, lr=lr, seed=seed)
    return dict(
        spec=dict(depth=depth, placement=placement, warmup=True, lr=lr, alpha=1.0, seed=seed),
        name=spec.name,
        steps_done=3000,
        diverged_at_step=None,
        heldout_loss=loss,
        shuffled_loss=shuffled,
        bleu=bleu,
        hypotheses=hyps,
    )


def test_failure_rule_against_the_bigram_with_the_old_rule_beside_it():
    refs = ["ethay atcay"]
    runs = [
        _result("post-ln", 0, 4.60, 0.5, [""]),  # above the bigram: failed by both rules
        _result("post-ln", 1, 4.20, 0.5, [""]),  # below the bigram, BLEU < 1: only the old rule
        _result("post-ln", 2, math.nan, 0.0, [""]),  # diverged: both
        _result("pre-ln", 0, 0.40, 85.0, [""]),
    ]
    curve = [
        dict(step=0, heldout_loss=8.50, shuffled_loss=8.52),
        dict(step=100, heldout_loss=5.00, shuffled_loss=5.05),  # within the margin
        dict(step=200, heldout_loss=4.20, shuffled_loss=4.35),  # 0.15 below: uses its source
        dict(step=300, heldout_loss=4.10, shuffled_loss=4.60),
    ]
    never = [dict(step=s, heldout_loss=4.6, shuffled_loss=4.62) for s in (0, 100)]
    cells = C.Cells(
        runs,
        refs,
        bigram=4.40,
        unigram=5.30,
        curves={runs[0]["name"]: never, runs[1]["name"]: curve},
    )
    assert [cells.failed(r) for r in runs] == [True, False, True, False]
    assert [cells.failed_bleu(r) for r in runs] == [True, True, True, False]
    assert cells.source_step(runs[1]) == 200 and cells.source_step(runs[0]) is None
    assert "uses its source: never" in cells.status(runs[0])
    assert "not logged" in cells.status(runs[3])  # no shuffled-source loss in its curve
    rows = C.paper_checks(cells, 1, 2, 1e-3, "tiny", True)
    row = next(c for c in rows if c.statement.startswith("Post-LN fails to train at E2D2"))
    assert row.measured.startswith("failed seeds 2/3") and "old rule" in row.measured
    assert ") 3/3;" in row.measured and "s1: 3000 steps, loss 4.2" in row.measured
    assert "from step 200" in row.measured and row.agreement == "not resolved"


def test_comparison_rows_carry_sentence_intervals_when_the_sentences_are_known():
    from test_translation_study import _clustered

    a0, b0, refs, clusters = _clustered(seed=0, sentences=20, per=3)
    a1, b1, _, _ = _clustered(seed=0, sentences=20, per=3)
    runs = [
        _result("residual", 0, 0.5, 50.0, a0),
        _result("residual", 1, 0.5, 50.0, a1),
        _result("pre-ln", 0, 0.5, 40.0, b0),
        _result("pre-ln", 1, 0.5, 40.0, b1),
    ]
    cell_a, cell_b = (2, "residual", True, 1e-3), (2, "pre-ln", True, 1e-3)
    with_sentences = C.Cells(runs, refs, 4.4, 5.3, clusters=clusters)
    row = C.compare(with_sentences, "A > B", "tiny", "residual", "paper", cell_a, cell_b)
    interval = significance.cluster_bootstrap(a0, b0, refs, clusters)
    assert interval.low < interval.diff < interval.high
    assert "95 % sentence-bootstrap interval" in row.measured
    # both seeds and their mean (seeds and sentences resampled): the same decodes here
    assert row.measured.count(interval.text()) == 3
    assert "(p " in row.measured  # sacrebleu's paired p-values stay
    pairs = with_sentences.pairs(cell_a, cell_b)
    assert pairs[0].diff == pytest.approx(interval.diff, abs=1e-9)
    without = C.Cells(runs, refs, 4.4, 5.3)
    row = C.compare(without, "A > B", "tiny", "residual", "paper", cell_a, cell_b)
    assert "no interval: hypotheses not stored" in row.measured and "[" not in row.measured
    assert (
        row.agreement
        == C.compare(with_sentences, "A > B", "tiny", "residual", "paper", cell_a, cell_b).agreement
    )
