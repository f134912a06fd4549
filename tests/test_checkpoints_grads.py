"""grad-norms --ckpt: the per-block gradient norms equal a direct autograd computation on the same
windows (float64; random-weight GPT-2, Llama, BERT-for-MLM configs and our own seq2seq), and bad
inputs fail with one line."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from residual_probe.checkpoints import load_any, save_model
from residual_probe.checkpoints.text import text_windows
from residual_probe.cli import app
from residual_probe.jobs.ckpt_grads import MASK_RATE, model_gradients
from residual_probe.models import ModelConfig, build_model
from residual_probe.probe import find_blocks

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"
SMALL = dict(
    vocab_size=120, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=24
)
TEXT = (
    "the residual stream of a deep transformer either keeps its gradient or keeps its representation "
    * 8
)
runner = CliRunner()


def bert_tokenizer(folder):
    words = (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        + sorted(set(TEXT.split()))
        + list("abcdefghijklmnopqrstuvwxyz")
    )
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tok.save_pretrained(folder)
    return tok


def save(name, folder):
    torch.manual_seed(0)
    if name == "gpt2":
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=300, n_embd=16, n_layer=3, n_head=2, n_positions=64)
        )
    elif name == "llama":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**{**SMALL, "vocab_size": 300}, num_key_value_heads=1)
        )
    else:
        model = transformers.BertForMaskedLM(transformers.BertConfig(**SMALL))
    model.save_pretrained(folder)
    if name == "bert":
        bert_tokenizer(folder)
    return model


def direct(model, blocks, kind, windows, mask_id=None, start=0):
    """One forward over all windows, mean cross-entropy over predicted positions, one backward."""
    model.zero_grad(set_to_none=True)
    if kind == "causal-lm":
        logits = _logits(model, windows)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
    elif kind == "mlm":
        gen = torch.Generator().manual_seed(0)
        masked = torch.rand(windows.shape, generator=gen) < MASK_RATE
        masked[:, 0] |= ~masked.any(dim=1)
        logits = _logits(model, windows.masked_fill(masked, mask_id))
        loss = F.cross_entropy(logits[masked], windows[masked])
    else:
        dec_in = torch.cat([torch.full_like(windows[:, :1], start), windows[:, :-1]], dim=1)
        logits = model(windows, dec_in)
        loss = F.cross_entropy(logits.flatten(0, 1), windows.flatten())
    loss.backward()
    return [
        math.sqrt(
            sum(
                float((p.grad.double() ** 2).sum())
                for p in b.module.parameters()
                if p.grad is not None
            )
        )
        for b in blocks
    ]


def _logits(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize(
    "name,kind", [("gpt2", "causal-lm"), ("llama", "causal-lm"), ("bert", "mlm")]
)
def test_hf_gradients_equal_direct_autograd(tmp_path, name, kind):
    save(name, tmp_path / name)
    loaded = load_any(tmp_path / name)
    assert loaded.default_loss == kind
    loaded.model.double()
    w = text_windows(loaded, TEXT, tokens=70, seq_len=12)  # 5 windows, batches of 2, 2, 1
    assert w.ids.shape == (5, 12)
    g = model_gradients(loaded, kind, w.ids, batch=2, seed=0)
    rows = g.rows
    got = [r["value"] for r in sorted(rows, key=lambda r: r["layer"]) if r["sublayer"] == "block"]
    want = direct(loaded.model, find_blocks(loaded.model), kind, w.ids, mask_id=loaded.mask_id)
    assert len(got) == 3 and got == pytest.approx(want, rel=1e-10)
    if name == "bert":
        assert "BertTokenizer" in w.tokenization and loaded.mask_id == 4


def test_our_seq2seq_gradients_equal_direct_autograd(tmp_path):
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            arch="seq2seq", placement="residual", depth=2, d_model=16, heads=2, ffn=24, max_len=64
        )
    )
    save_model(model, tmp_path / "m")
    loaded = load_any(tmp_path / "m")
    loaded.model.double()
    w = text_windows(loaded, TEXT, tokens=60, seq_len=20)
    g = model_gradients(loaded, "seq2seq", w.ids, batch=2)
    rows, blocks = g.rows, g.blocks
    got = {(r["stack"], r["layer"]): r["value"] for r in rows if r["sublayer"] == "block"}
    want = direct(loaded.model, blocks, "seq2seq", w.ids, start=0)
    assert [got[(b.stack, b.index)] for b in blocks] == pytest.approx(want, rel=1e-10)


def test_cli_writes_the_reference_files_and_prints_the_verdict(tmp_path):
    torch.manual_seed(0)
    save_model(
        build_model(
            ModelConfig(
                arch="decoder",
                placement="post-ln",
                depth=4,
                d_model=16,
                heads=2,
                ffn=24,
                max_len=64,
            )
        ),
        tmp_path / "post",
    )
    res = runner.invoke(
        app,
        [
            "grad-norms",
            "--ckpt",
            str(tmp_path / "post"),
            "--tokens",
            "100",
            "--seq-len",
            "32",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert (
        "note: --tokens 100 rounded down to 96" in res.output
        and "tokenization: UTF-8 bytes" in res.output
    )
    assert (
        "verdict decoder:" in res.output
        and "per block" in res.output
        and "first/median" in res.output
    )
    for f in ("grad_norms.csv", "grad_norms.json", "grad_norms.png"):
        assert (tmp_path / "out" / f).is_file()
    header = (tmp_path / "out" / "grad_norms.csv").read_text().splitlines()[0]
    assert header == "model,seed,step,stack,layer,sublayer,param_grad_norm"
    meta = json.loads((tmp_path / "out" / "grad_norms.json").read_text())
    m = meta["models"][0]
    assert (
        m["placement"] == "post-ln" and m["loss"] == "causal-lm" and m["norm_type"] == "layernorm"
    )
    v = m["verdicts"][0]
    assert v["rate_low"] <= v["rate"] <= v["rate_high"] and v["blocks"] == 4


def test_bad_inputs_fail_with_one_line(tmp_path):
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**SMALL)).save_pretrained(tmp_path / "bare")
    save_model(
        build_model(
            ModelConfig(
                arch="decoder", placement="pre-ln", depth=2, d_model=16, heads=2, ffn=24, max_len=64
            )
        ),
        tmp_path / "lm",
    )
    (tmp_path / "short.txt").write_text("too short")
    cases = [
        (
            ["--ckpt", str(tmp_path / "bare")],
            "BertModel has no head that defines a loss; --loss chooses among causal-lm, seq2seq, mlm",
        ),
        (
            [
                "--ckpt",
                str(tmp_path / "lm"),
                "--data",
                str(tmp_path / "short.txt"),
                "--seq-len",
                "32",
            ],
            "shorter than one window of --seq-len 32",
        ),
        (
            ["--ckpt", str(tmp_path / "lm"), "--loss", "nonsense"],
            "--loss: unknown 'nonsense'; choose one of causal-lm, seq2seq, mlm",
        ),
        (
            ["--ckpt", str(tmp_path / "lm"), "--loss", "mlm"],
            "--loss mlm needs a head this model lacks",
        ),
    ]
    for args, message in cases:
        res = runner.invoke(app, ["grad-norms", *args, "--out", str(tmp_path / "o")])
        assert res.exit_code == 2, res.output
        err = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and message in err[0], res.output
        assert "Traceback" not in res.output
        assert not (tmp_path / "o" / "grad_norms.json").exists()


def test_contrastive_loss_of_a_bare_encoder_equals_a_direct_simcse(tmp_path):
    """A head-less BertModel: --loss contrastive (SimCSE: two dropout views, mean pooling, InfoNCE at
    temperature 0.05) gives the per-block gradient norms of a direct computation with the same
    dropout masks; diagnose uses it by default and says so."""
    transformers = pytest.importorskip("transformers")
    import torch.nn.functional as F

    from residual_probe.checkpoints import load_any
    from residual_probe.jobs.ckpt_grads import model_gradients
    from residual_probe.probe import find_blocks

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    loaded = load_any(tmp_path / "bert")
    assert loaded.default_loss is None  # a bare encoder: no head
    ids = torch.randint(5, 300, (6, 16))
    torch.manual_seed(7)
    rows, loss, blocks, vocab, unused, _ = model_gradients(loaded, "contrastive", ids, batch=3)
    got = {r["layer"]: r["value"] for r in rows if r["sublayer"] == "block"}
    # direct: the same seed, so the same dropout masks, batch by batch
    model = loaded.model
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    model.train()
    total = 0.0
    for w in ids.split(3):
        z1 = model(input_ids=w).last_hidden_state.mean(1)
        z2 = model(input_ids=w).last_hidden_state.mean(1)
        sim = F.cosine_similarity(z1[:, None], z2[None], dim=-1) / 0.05
        part = F.cross_entropy(sim, torch.arange(w.shape[0]), reduction="sum")
        (part / 6).backward()
        total += float(part)
    model.eval()
    want = {
        b.index: math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in b.module.parameters()))
        for b in find_blocks(model)
    }
    assert loss == pytest.approx(total / 6, rel=1e-6) and vocab == 3
    assert sorted(got) == [0, 1, 2]
    for k in got:
        assert got[k] == pytest.approx(want[k], rel=1e-5)
    # the pooler is not in the loss: no .grad, named as unused, no NaN row; BERT's LayerNorm on the
    # embedding is the embedding norm (a Post-LN BERT has no final norm); the total is
    # clip_grad_norm_'s over the parameters that have a gradient
    assert unused == {"other": ["pooler.dense.weight", "pooler.dense.bias"]}
    assert model.pooler.dense.weight.grad is None
    whole = {r["sublayer"]: r["value"] for r in rows if r["stack"] == "model"}
    assert set(whole) == {"embedding", "embedding_norm", "total"}
    assert whole["embedding_norm"] == pytest.approx(
        math.sqrt(
            sum(
                float((p.grad.double() ** 2).sum()) for p in model.embeddings.LayerNorm.parameters()
            )
        ),
        rel=1e-5,
    )
    clip = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9).item()
    assert whole["total"] == pytest.approx(clip, rel=1e-5)
    # diagnose: the contrastive loss by default for a head-less checkpoint, named in the verdict
    from typer.testing import CliRunner

    from residual_probe.cli import app

    r = CliRunner().invoke(
        app,
        [
            "diagnose",
            "--ckpt",
            str(tmp_path / "bert"),
            "--tokens",
            "256",
            "--seq-len",
            "32",
            "--out",
            str(tmp_path / "d"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert (
        "gradient of a contrastive loss" in r.stdout and "gradients: not measured" not in r.stdout
    )
    report = (tmp_path / "d" / "report.md").read_text()
    assert "| contrastive |" in report
    unused = "no gradient (not used by this loss): other (pooler.dense.weight, pooler.dense.bias)"
    assert unused in r.stdout and unused in report and " nan" not in r.stdout
    # grad-norms: the same words, and no non-finite warning for the unused pooler
    r = CliRunner().invoke(
        app,
        ["grad-norms", "--ckpt", str(tmp_path / "bert"), "--loss", "contrastive", "--tokens", "256"]
        + ["--seq-len", "32", "--out", str(tmp_path / "g")],
    )
    assert r.exit_code == 0, r.output
    assert unused in r.stdout and "embedding_norm" in r.stdout and "final_norm" not in r.stdout
    assert "non-finite" not in r.stderr and "no .grad" not in r.stderr
    saved = json.loads((tmp_path / "g" / "grad_norms.json").read_text())["models"][0]
    assert saved["nonfinite_values"] == 0 and "other" not in saved["whole_model"]
