"""ProbeCallback in a real Hugging Face Trainer run: pre-clip norms, accumulation, logs, sink.

Tiny random-weight GPT-2, Llama and BERT built from their config classes; CPU, offline, a few
optimizer steps each. The reference for "pre-clip" is computed inside the Trainer itself, in an
override of `_clip_grad_norm` that reads `.grad` right before the Trainer clips.
"""

import functools
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from ranks import spawn_ranks  # noqa: E402

from residual_probe.integrations.hf import ProbeCallback  # noqa: E402
from residual_probe.probe.records import read_sink  # noqa: E402

VOCAB, SEQ = 64, 8


def make_model(family: str, layers: int = 3):
    T = transformers
    torch.manual_seed(0)
    small = dict(
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=16,
    )
    if family == "gpt2":
        return T.GPT2LMHeadModel(
            T.GPT2Config(
                n_layer=layers,
                n_embd=32,
                n_head=2,
                vocab_size=VOCAB,
                n_positions=16,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
        )
    if family == "llama":
        return T.LlamaForCausalLM(
            T.LlamaConfig(num_hidden_layers=layers, num_key_value_heads=1, **small)
        )
    if family == "bert":
        return T.BertForMaskedLM(
            T.BertConfig(
                num_hidden_layers=layers,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                **small,
            )
        )
    if family == "gemma2":  # each sublayer's output normalized before it joins the stream
        return T.Gemma2ForCausalLM(
            T.Gemma2Config(num_hidden_layers=layers, num_key_value_heads=1, head_dim=16, **small)
        )
    raise KeyError(family)


def dataset(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def block_params(model):
    from residual_probe.probe import find_blocks

    return [[p for p in b.module.parameters()] for b in find_blocks(model)]


@functools.cache
def ref_trainer():
    """The Trainer subclass below, made on first use: transformers.Trainer takes 2 s to import,
    which collection would otherwise pay in every xdist worker."""

    class RefTrainer(transformers.Trainer):
        """Records plain per-block norms of the gradient the Trainer is about to clip (float64)."""

        def _clip_grad_norm(self, model):
            ref = getattr(self, "ref", {})
            ref[self.state.global_step + 1] = [
                math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in ps))
                for ps in block_params(self.model)
            ]
            self.ref = ref
            total = super()._clip_grad_norm(model)
            self.clipped_total = getattr(self, "clipped_total", []) + [
                float(
                    torch.sqrt(
                        sum(
                            (p.grad.double() ** 2).sum()
                            for p in self.model.parameters()
                            if p.grad is not None
                        )
                    )
                )
            ]
            return total

    return RefTrainer


def train(
    tmp_path,
    family="gpt2",
    max_grad_norm=0.0,
    accumulation=1,
    steps=3,
    logging_steps=1,
    trainer_cls=None,
    report_to="none",
    **probe_kwargs,
):
    model = make_model(family)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=1e-2,
        max_grad_norm=max_grad_norm,
        logging_steps=logging_steps,
        report_to=report_to,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_drop_last=True,
        lr_scheduler_type="constant",
        data_seed=0,
    )
    cb = ProbeCallback(**probe_kwargs)
    trainer = (trainer_cls or transformers.Trainer)(
        model=model, args=args, train_dataset=dataset(2 * accumulation * steps), callbacks=[cb]
    )
    trainer.train()
    return trainer, cb


def block_norms(rows):
    by_step = {}
    for r in rows:
        if r["metric"] == "param_grad_norm" and r["sublayer"] == "block":
            by_step.setdefault(r["step"], {})[r["layer"]] = r["value"]
    return {s: [v[k] for k in sorted(v)] for s, v in by_step.items()}


def test_preclip_norms_exact_when_every_step_clips(tmp_path):
    clipped, cb = train(
        tmp_path / "clip",
        max_grad_norm=1e-4,
        steps=4,
        trainer_cls=ref_trainer(),
        quantities=("param_grad_norm",),
    )
    free, cb_free = train(
        tmp_path / "free", max_grad_norm=0.0, steps=4, quantities=("param_grad_norm",)
    )
    got, ref = block_norms(cb.probe.rows()), clipped.ref
    assert (
        sorted(got) == sorted(ref) == [1, 2, 3, 4]
    )  # one recorded step per optimizer step, numbered as the Trainer
    # every step was clipped, hard: the clipped total norm is max_grad_norm, far below the per-block norms
    assert all(abs(t - 1e-4) / 1e-4 < 1e-3 for t in clipped.clipped_total)
    assert min(min(v) for v in ref.values()) > 100 * 1e-4
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-5), s
    # step 1: same weights and batch with and without clipping
    assert got[1] == pytest.approx(block_norms(cb_free.probe.rows())[1], rel=1e-5)
    # the sink is the default <output_dir>/probe.csv and holds the same rows (to its 7 digits)
    stored = block_norms(read_sink(tmp_path / "clip" / "probe.csv").rows)
    assert stored.keys() == got.keys() and all(
        stored[s] == pytest.approx(got[s], rel=6e-7) for s in got
    )


def test_gradient_accumulation_one_step_per_optimizer_step(tmp_path):
    trainer, cb = train(
        tmp_path,
        max_grad_norm=1e-3,
        accumulation=3,
        steps=2,
        trainer_cls=ref_trainer(),
        quantities=("param_grad_norm", "act_grad_norm"),
    )
    got = block_norms(cb.probe.rows())
    assert sorted(got) == [1, 2]
    for s in (1, 2):
        assert got[s] == pytest.approx(trainer.ref[s], rel=1e-5)
    # the activation gradient pools all three micro-batches' tokens: one row per block per step
    act = [r for r in cb.probe.rows() if r["metric"] == "act_grad_norm"]
    assert len(act) == 2 * 3 and all(r["value"] > 0 for r in act)


@pytest.mark.parametrize("family,stack", [("llama", "decoder"), ("bert", "encoder")])
def test_families_and_logged_summaries(tmp_path, family, stack):
    trainer, cb = train(
        tmp_path,
        family=family,
        max_grad_norm=1.0,
        steps=2,
        logging_steps=1,
        quantities=("param_grad_norm", "forward_stats"),
    )
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    keys = sorted(k for k in logged[0] if k.startswith("probe/"))
    assert f"probe/grad_norm/{stack}/00" in keys and f"probe/block_influence/{stack}/02" in keys
    assert f"probe/first_over_last/{stack}" in keys and f"probe/late_cos_adjacent/{stack}" in keys
    # forward statistics on the first recorded step and every 10th (FORWARD_EVERY): not on step 2
    assert not any("block_influence" in k or "late_cos" in k for k in logged[-1])
    assert {r["step"] for r in cb.probe.rows() if r["metric"] == "cos_adjacent"} == {1}
    # grouped, not one key per parameter: per block 2 x 3, per stack 6, the whole model's parts and
    # total (at most 5), the instability count and last block, the precursor count
    assert len(keys) <= 3 * 2 + 6 + 5 + 3 and "probe/grad_norm_model/total" in keys
    rows = cb.probe.rows()
    last = {
        r["layer"]: r["value"]
        for r in rows
        if r["step"] == 2 and r["metric"] == "param_grad_norm" and r["sublayer"] == "block"
    }
    assert logged[-1][f"probe/grad_norm/{stack}/01"] == last[1]
    assert logged[-1][f"probe/first_over_last/{stack}"] == pytest.approx(last[0] / last[2])


def test_attention_and_precursor_keys_reach_the_log(tmp_path):
    """The default quantities with forward_every=1: every log has the per-block attention keys,
    log Z and the precursor count, which is the count of the callback's precursor monitor."""
    trainer, cb = train(tmp_path, steps=2, logging_steps=1, forward_every=1)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    rows = cb.probe.rows()
    for log in logged:
        step = log["step"]
        block = {
            (r["metric"], r["layer"]): r["value"]
            for r in rows
            if r["step"] == step and r["sublayer"] == "block"
        }
        assert log["probe/attn_logit_max/transformer.h/01"] == block["attn_logit_max", 1]
        assert log["probe/attn_entropy/transformer.h/00"] == block["attn_entropy", 0]
        (z,) = [r["value"] for r in rows if r["step"] == step and r["metric"] == "logit_z_mean"]
        assert log["probe/logit_z_mean"] == z
    assert logged[-1]["probe/precursors"] == len(cb.instability.precursors.precursors)


def test_summaries_reach_a_report_to_logger(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, cb = train(
        tmp_path, steps=2, logging_steps=1, report_to="tensorboard", quantities=("param_grad_norm",)
    )
    runs = (
        list((tmp_path / "runs").glob("*"))
        if (tmp_path / "runs").exists()
        else list(tmp_path.rglob("events.*"))
    )
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events, runs
    acc = EventAccumulator(str(events[0].parent)).Reload()
    tags = acc.Tags()["scalars"]
    assert "train/probe/grad_norm/transformer.h/00" in tags
    values = [e.value for e in acc.Scalars("train/probe/grad_norm/transformer.h/00")]
    assert len(values) == 2 and all(v > 0 for v in values)


def test_a_spike_between_two_logs_reaches_the_log_at_its_step(tmp_path):
    """Logging every 3rd step: the log at step 3 has step 3's values and the max over steps 1-3;
    the probe's step, global_step and the logged step are one number; probe_run.json is written."""
    trainer, cb = train(tmp_path, steps=3, logging_steps=3, quantities=("param_grad_norm",))
    rows = cb.probe.rows()
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert log["step"] == trainer.state.global_step == 3 == max(r["step"] for r in rows)
    key = "transformer.h/00"
    per_step = {
        r["step"]: r["value"]
        for r in rows
        if r["metric"] == "param_grad_norm" and r["layer"] == 0 and r["sublayer"] == "block"
    }
    assert (
        sorted(per_step) == [1, 2, 3] and max(per_step.values()) > per_step[3]
    )  # the window is what is tested
    assert log[f"probe/grad_norm/{key}"] == per_step[3]
    assert log[f"probe_max/grad_norm/{key}"] == max(per_step.values())
    info = json.loads((tmp_path / "probe_run.json").read_text())
    assert info["placement"] == "pre-ln" and info["model_type"] == "gpt2"
    assert info["placement_source"] == "detected from the block structure"


def test_run_info_reads_the_placement_from_the_blocks_not_the_model_type(tmp_path):
    """Gemma 2 normalizes each sublayer's output before the residual sum (sandwich): probe_run.json
    says so, so `plot` draws no Pre-LN collapse reference on its run."""
    from residual_probe.models.placements import pre_ln_like

    train(tmp_path, family="gemma2", steps=1, quantities=("param_grad_norm",))
    info = json.loads((tmp_path / "probe_run.json").read_text())
    assert (info["model_type"], info["placement"]) == ("gemma2", "sandwich")
    assert not pre_ln_like(info["placement"], "x") and pre_ln_like("pre-ln", "x")


def test_no_sink_schedule_and_bad_kwargs(tmp_path):
    trainer, cb = train(tmp_path, steps=3, sink=None, every=2, quantities=("param_grad_norm",))
    assert not (tmp_path / "probe.csv").exists()
    assert sorted({r["step"] for r in cb.probe.rows()}) == [2]  # every=2 of optimizer steps 1, 2, 3
    # a log after a recorded step carries its summaries; a log after a skipped step none
    logged = {
        h["step"]: any(k.startswith("probe/") for k in h)
        for h in trainer.state.log_history
        if "loss" in h
    }
    assert logged == {1: False, 2: True, 3: False}
    with pytest.raises(TypeError, match="sets 'model'"):
        ProbeCallback(model=None)


def _ddp_worker(rank, world, tmp, port):
    import os

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    args = transformers.TrainingArguments(
        output_dir=tmp,
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        max_grad_norm=1e-4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        ddp_backend="gloo",
        lr_scheduler_type="constant",
        logging_steps=1,
    )
    cb = ProbeCallback(quantities=("param_grad_norm",), sink=None)
    trainer = ref_trainer()(
        model=make_model("gpt2"), args=args, train_dataset=dataset(8), callbacks=[cb]
    )
    trainer.train()
    out = {
        "wrapped": type(trainer.model_wrapped).__name__,
        "ref": trainer.ref,
        "got": {s: v for s, v in block_norms(cb.probe.rows()).items()},
    }
    with open(f"{tmp}/out{rank}.json", "w") as fh:
        json.dump(out, fh)
    import torch.distributed as dist

    if (
        dist.is_initialized()
    ):  # a process group left to the interpreter's exit can abort in gloo's teardown
        dist.barrier()
        dist.destroy_process_group()


def test_ddp_two_processes_read_the_synchronized_gradient(tmp_path):
    """Under DDP each rank's backward ends before the all-reduce finishes; the callback must read after it.

    Each rank sees different data, so a local read would differ between ranks and from the
    Trainer's pre-clip gradient (recording at the first queued callback instead gave 62 % errors).
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn_ranks(_ddp_worker, args=(2, str(tmp_path), port), nprocs=2)
    outs = [json.load(open(tmp_path / f"out{r}.json")) for r in range(2)]
    assert outs[0]["wrapped"] == "DistributedDataParallel"
    for o in outs:
        assert sorted(o["got"]) == sorted(o["ref"]) == ["1", "2"]  # the Trainer's step numbers
        for s in o["ref"]:
            assert o["got"][s] == pytest.approx(o["ref"][s], rel=1e-5)
    for s in ("1", "2"):
        assert outs[0]["got"][s] == pytest.approx(outs[1]["got"][s], rel=1e-6)
