"""The translation study's character-level task (where depth can matter) and its depth gate."""

import re

import pytest

from residual_probe.studies.translation import checks as C
from residual_probe.studies.translation import runs as R
from residual_probe.studies.translation import task as T

CHARS = "pig-latin-chars"


def test_char_task_keeps_unseen_words_and_references_follow_the_rule():
    data = T.task_data(task=CHARS)
    words = T.task_data()  # the word-level task on the same sentences
    assert data.sentences == words.sentences and data.train.keys() != words.train.keys()
    assert set(words.heldout) < set(data.heldout)  # characters drop nothing the words keep
    seen = {w for n in data.train for u in data.train[n] for w in re.findall("[a-z]+", u)}
    unseen = [u for u in data.heldout if set(re.findall("[a-z]+", u)) - seen]
    assert unseen and len(unseen) == data.unseen_kept
    assert words.unseen_kept == 0
    refs = T.references(data.heldout, data)
    for u, ref in zip(data.heldout, refs):
        # every word of the reference is the rule applied to the source's word, seen or not
        assert re.findall("[a-z]+", ref) == [T.pig_latin_word(w) for w in re.findall("[a-z]+", u)]
        assert re.sub("[a-z]+", "", ref) == re.sub("[a-z]+", "", u)  # the rest stays in place
    # a unit's tokens are its characters (space the separator); the batches carry them and EOS
    src, _, targets = T.encode_pairs(unseen[:1], data)
    assert [data.vocab[i] for i in src[0]] == list(unseen[0])
    assert "".join(data.vocab[i] for i in targets[0][:-1]) == refs[data.heldout.index(unseen[0])]
    clusters = T.heldout_clusters(data)
    assert len(clusters) == len(data.heldout) and len(set(clusters)) == data.sentences[1]
    # decoding can write the longest target of a source of its length
    assert all(len(T.pig_latin(u)) < data.scheme.max_new(len(u)) for u in data.heldout)


def test_two_training_steps_on_the_char_task(tmp_path):
    spec = R.RunSpec("residual", 1, True, seed=0, lr=1e-3, **{**R.common(True, CHARS), "steps": 2})
    assert spec.name.endswith("-" + CHARS) and not R.RunSpec("residual", 1, True).name.endswith(
        CHARS
    )
    grid = R.stage_a(True, CHARS) + R.stage_b(True, 1e-3, CHARS)
    assert {s.task for s in grid} == {CHARS}
    assert all(s.min_steps for s in grid)  # the gate, too, is read where training levelled off
    res = R.train_run(spec, tmp_path / spec.name)
    data = T.task_data(task=CHARS)
    assert res["steps_done"] == 2 and len(res["hypotheses"]) == len(data.heldout)
    assert res["spec"]["task"] == CHARS and 0.0 <= res["bleu"] <= 100.0
    assert R.load_result(spec, tmp_path) is not None


def _cells(bleu: dict[tuple, list[float]]) -> C.Cells:
    results = []
    for (depth, placement), values in bleu.items():
        for seed, b in enumerate(values):
            spec = dict(
                depth=depth, placement=placement, warmup=True, lr=1e-3, alpha=1.0, seed=seed
            )
            hyps = ["ethay atcay"]  # the paired rows need decodes; the gate reads BLEU only
            results.append(
                dict(spec=spec, bleu=b, name=f"{depth}-{placement}-{seed}", hypotheses=hyps)
            )
    return C.Cells(results, refs=["ethay atcay"], bigram=5.0, unigram=6.0)


@pytest.mark.parametrize(
    "pre, res, gate, claim",
    [
        # deep Pre-LN above every shallow seed; ResiDual gains more in every seed
        ({6: [50, 51], 12: [53, 54]}, {6: [50, 51], 12: [58, 60]}, "yes", "yes"),
        # the gate passes and ResiDual gains less in every seed
        ({6: [50, 51], 12: [53, 54]}, {6: [50, 51], 12: [51, 52]}, "yes", "no"),
        # the seeds disagree on which gains more
        ({6: [50, 51], 12: [53, 55]}, {6: [50, 51], 12: [54, 53]}, "yes", "not resolved"),
        # deep Pre-LN within the shallow spread: the claim is not tested
        ({6: [50, 54], 12: [53, 56]}, {6: [50, 51], 12: [58, 60]}, "no", None),
    ],
)
def test_depth_gate_guards_the_extra_layers_claim(pre, res, gate, claim):
    bleu = {(n, "pre-ln"): v for n, v in pre.items()} | {(n, "residual"): v for n, v in res.items()}
    rows = C.depth_checks(_cells(bleu), 6, 12, 1e-3, "fake")
    assert [r.agreement for r in rows][0] == gate
    if claim is None:
        assert rows[1].agreement == rows[1].measured == "not tested: depth gate did not pass"
    else:
        assert rows[1].agreement == claim


def test_depth_gate_not_run_without_runs():
    rows = C.depth_checks(_cells({}), 6, 12, 1e-3, "fake")
    assert rows[0].agreement == "not run" and rows[1].agreement.startswith("not tested")


def test_depth_gate_row_names_the_runs_that_stopped_at_the_cap():
    cells = _cells({(6, "pre-ln"): [50, 51], (12, "pre-ln"): [53, 54]})
    for seeds in cells.runs.values():
        for r in seeds.values():
            r["spec"]["min_steps"], r["converged"], r["diverged_at_step"] = (
                3000,
                r["bleu"] > 53,
                None,
            )
    gate = C.depth_checks(cells, 6, 12, 1e-3, "fake")[0]
    assert gate.agreement == "yes"
    assert gate.measured.endswith(
        "stopped at the cap before the rule held: 12-pre-ln-0, 6-pre-ln-0, 6-pre-ln-1"
    )
