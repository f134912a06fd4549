"""Fixtures shared by the suite: each expensive artefact is made once per test run.

- One torch thread per process (OMP_NUM_THREADS, set before torch is imported, so the
  processes that tests start inherit it): the suite's models are tiny, and on 2 cores two
  intra-op threads per process cost more in synchronisation than they gain (test_instability,
  test_bounds, test_edges_files and test_placements together: 74 s with the default threads,
  26 s with one, on a busy 2-core machine). A value set by the caller is kept.
- Helpers the test modules import (`from conftest import ...`): `tiny_model`, the seeded small
  reference model; `keyed`, probe rows by their key; `assert_values_close`, keyed values equal to
  float64 precision.
- `quick_figures`: `run_all(quick=True)` into one folder (every study, the translation grid
  included), read by test_analyses.py, test_translation_study.py and test_bounds.py. It is the
  suite's largest single cost (about 40 s on one core), so when a selected test needs it, a
  separate process starts making it as the session's first test starts, and the modules that
  read it are collected last: it is made beside the rest of the suite instead of before it.
  Under pytest-xdist (`make test`: one worker per core, work stealing) the first worker to start
  claims it and the others wait for its result, so it is made once per run, not once per worker.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
import multiprocessing
import time
from pathlib import Path

import pytest

ROW_KEY = ("step", "stack", "layer", "sublayer", "stream", "metric")


def tiny_model(placement="pre-ln", arch="decoder", seed=0, **sizes):
    """A reference model seeded with `seed`, small enough for a unit test; `sizes` overrides any
    ModelConfig field (depth 2, d_model 16, 2 heads, FFN 32, 256 tokens, max_len 32 otherwise)."""
    import torch

    from residual_probe.models import ModelConfig, build_model

    torch.manual_seed(seed)
    fields = dict(depth=2, d_model=16, heads=2, ffn=32, max_len=32)
    return build_model(ModelConfig(arch=arch, placement=placement, **{**fields, **sizes}))


def keyed(rows, with_step: bool = True) -> dict:
    """Probe rows as {(step, stack, layer, sublayer, stream, metric): value}; without the step
    for one step's rows."""
    key = ROW_KEY if with_step else ROW_KEY[1:]
    return {tuple(r[k] for k in key): r["value"] for r in rows}


def assert_values_close(got: dict, ref: dict, same_keys: bool = True) -> None:
    """Every value of `ref` equals `got`'s under the same key to float64 precision (the probe and
    its direct twin sum in other orders); `same_keys`: and `got` holds no other key."""
    if same_keys:
        assert set(got) == set(ref), set(got) ^ set(ref)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


QUICK = "quick_figures"
WAIT = 900  # seconds a reader waits for quick_figures (it takes about 40)
# Under xdist the workers lower their own priority by this much once quick_figures is started, so
# that its process, the longest single piece of the run, gets a whole core and is done before its
# readers (collected last) ask for it; two workers and it on two cores otherwise share them evenly.
WORKER_NICE = 5


def make_quick_figures(shared: str) -> None:
    """In the separate process: run_all(quick=True) into SHARED/out, then SHARED/result.json (written
    last and atomically): {"status": "ok", "meta": ...} or {"status": "error", "traceback": ...}."""
    import traceback

    try:
        devnull = os.open(
            os.devnull, os.O_WRONLY
        )  # the studies' progress lines: not in pytest's output
        os.dup2(devnull, 1)
        from residual_probe.studies import run_all

        result = {
            "status": "ok",
            "meta": run_all(
                os.path.join(shared, "out"), quick=True, echo=lambda line, err=True: None
            ),
        }
    except BaseException:
        result = {"status": "error", "traceback": traceback.format_exc()}
    write_result(Path(shared), result)


def write_result(shared: Path, result: dict) -> None:
    """SHARED/result.json, atomically: a reader polling for it never sees half of it."""
    (shared / "result.tmp").write_text(json.dumps(result))
    os.replace(shared / "result.tmp", shared / "result.json")


def pytest_collection_modifyitems(session, config, items):
    """The modules that read `quick_figures` are collected last (each kept whole, in its own order)."""
    readers = {item.module.__name__ for item in items if QUICK in getattr(item, "fixturenames", ())}
    items.sort(
        key=lambda item: (
            getattr(item, "module", None) is not None and item.module.__name__ in readers
        )
    )


def shared_temp(tmp_path_factory) -> Path:
    """A folder every worker of this run sees: under xdist the workers' base temps are siblings."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def _quick_figures_in_background(request, tmp_path_factory):
    """Starts `quick_figures`' work in a separate process when the session's first test starts, if
    any selected test reads it and no other worker of this run has claimed it (mkdir is the claim).
    The claiming worker waits for that process at its end, since another worker may still read it."""
    if not any(QUICK in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    shared = shared_temp(tmp_path_factory) / QUICK
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    try:
        shared.mkdir()
    except FileExistsError:  # another worker makes it
        os.nice(WORKER_NICE)
        yield shared
        return
    ctx = multiprocessing.get_context("spawn")  # not fork: this process has imported torch
    proc = ctx.Process(target=make_quick_figures, args=(str(shared),), daemon=True)
    proc.start()
    if worker:
        os.nice(WORKER_NICE)  # after the start: the process making quick_figures keeps priority 0
    try:
        yield shared
    finally:
        if worker:
            proc.join(WAIT)
        if proc.is_alive():  # no reader is left in this process: not needed any more
            proc.terminate()
        proc.join()
        if not (shared / "result.json").exists():
            write_result(
                shared, {"status": "error", "traceback": f"ended with exit code {proc.exitcode}"}
            )


@pytest.fixture(scope="session")
def quick_figures(_quick_figures_in_background):
    shared = _quick_figures_in_background
    deadline = time.monotonic() + WAIT
    while not (shared / "result.json").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"run_all(quick=True): no result after {WAIT} s")
        time.sleep(0.2)
    result = json.loads((shared / "result.json").read_text())
    if result["status"] != "ok":
        raise RuntimeError(f"run_all(quick=True) failed:\n{result['traceback']}")
    return shared / "out", result["meta"]


HF_SMALL = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
)
# DeepSeek: hidden 64 with low-rank q (32) and kv (16) latents, so their norms have other widths
HF_DEEPSEEK = dict(
    vocab_size=64,
    hidden_size=64,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    q_lora_rank=32,
    max_position_embeddings=64,
)


def tiny_hf_config(name: str):
    """A random-init tiny transformers config of a family (offline): deepseek_v3, deepseek_v4, qwen3,
    olmo2, gemma2, gemma3, llama, gpt2, bert, t5, bart."""
    import transformers as t

    return {
        "deepseek_v3": lambda: t.DeepseekV3Config(
            **HF_DEEPSEEK,
            intermediate_size=96,
            num_key_value_heads=4,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
        "deepseek_v4": lambda: t.DeepseekV4Config(
            **HF_DEEPSEEK,
            head_dim=16,
            o_groups=2,
            o_lora_rank=16,
            index_n_heads=2,
            index_head_dim=16,
            index_topk=4,
            sliding_window=8,
            num_nextn_predict_layers=0,
            layer_types=["sliding_attention"] * 2,
        ),
        "qwen3": lambda: t.Qwen3Config(**HF_SMALL, num_key_value_heads=2, head_dim=8),
        "olmo2": lambda: t.Olmo2Config(**HF_SMALL, num_key_value_heads=2),
        "gemma2": lambda: t.Gemma2Config(**HF_SMALL, num_key_value_heads=2, head_dim=8),
        "gemma3": lambda: t.Gemma3TextConfig(**HF_SMALL, num_key_value_heads=2, head_dim=8),
        "llama": lambda: t.LlamaConfig(**HF_SMALL, num_key_value_heads=2),
        "gpt2": lambda: t.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "bert": lambda: t.BertConfig(**HF_SMALL),
        "t5": lambda: t.T5Config(
            vocab_size=64,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
        ),
        "bart": lambda: t.BartConfig(
            vocab_size=64,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            max_position_embeddings=64,
        ),
    }[name]()
