"""Fixtures shared by the suite: each expensive artefact is made once per test run.

- `quick_figures`: `run_all(quick=True)` into one folder (every study, the translation grid
  included), read by test_analyses.py and test_translation_study.py.
"""

import pytest


@pytest.fixture(scope="session")
def quick_figures(tmp_path_factory):
    import torch

    from residual_probe.studies import run_all

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the studies' quick sizes run fastest on one thread
    try:
        out = tmp_path_factory.mktemp("figures")
        meta = run_all(out, quick=True, echo=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    return out, meta
