"""Fixtures shared by the suite: each expensive artefact is made once per test run.

- One torch thread per process (OMP_NUM_THREADS, set before torch is imported, so the
  processes that tests start inherit it): the suite's models are tiny, and on 2 cores two
  intra-op threads per process cost more in synchronisation than they gain (test_instability,
  test_bounds, test_edges_files and test_placements together: 74 s with the default threads,
  26 s with one, on a busy 2-core machine). A value set by the caller is kept.
- `quick_figures`: `run_all(quick=True)` into one folder (every study, the translation grid
  included), read by test_analyses.py and test_translation_study.py. It is the suite's largest
  single cost (about 40 s on one core), so when a selected test needs it, a second process
  starts making it as the session's first test starts, and the modules that read it run last:
  it is made beside the rest of the suite instead of before it. The same call, the same files:
  only where and when it runs changes.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import multiprocessing  # noqa: E402

import pytest  # noqa: E402

QUICK = "quick_figures"


def make_quick_figures(out: str, conn) -> None:
    """In the second process: run_all(quick=True) into `out`; sends ("ok", meta) or ("error", traceback)."""
    import traceback

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)  # the studies' progress lines: not in pytest's output
        os.dup2(devnull, 1)
        from residual_probe.studies import run_all

        conn.send(("ok", run_all(out, quick=True, echo=lambda line: None)))
    except BaseException:  # noqa: BLE001 - the test that reads the result reports it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def pytest_collection_modifyitems(session, config, items):
    """The modules that read `quick_figures` run last (each module kept whole, in its own order)."""
    readers = {item.module.__name__ for item in items if QUICK in getattr(item, "fixturenames", ())}
    items.sort(key=lambda item: getattr(item, "module", None) is not None and item.module.__name__ in readers)


@pytest.fixture(scope="session", autouse=True)
def _quick_figures_in_background(request, tmp_path_factory):
    """Starts `quick_figures`' work in a second process when the session's first test starts, if any
    selected test reads it; stops that process at the end of the session if it still runs."""
    if not any(QUICK in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    out = tmp_path_factory.mktemp("figures")
    ctx = multiprocessing.get_context("spawn")  # not fork: this process has imported torch
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=make_quick_figures, args=(str(out), send), daemon=True)
    proc.start()
    send.close()  # the child holds the sending end: its exit without a result reads as EOFError
    try:
        yield out, receive
    finally:
        if proc.is_alive():
            proc.terminate()
        proc.join()
        receive.close()


@pytest.fixture(scope="session")
def quick_figures(_quick_figures_in_background):
    out, receive = _quick_figures_in_background
    try:
        status, value = receive.recv()  # waits for the second process
    except EOFError:
        raise RuntimeError("run_all(quick=True): the process making it ended without a result") from None
    if status != "ok":
        raise RuntimeError(f"run_all(quick=True) failed:\n{value}")
    return out, value
