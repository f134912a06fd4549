"""The `residual-probe` command line: one command per job.

    app.py       the Typer app; errors, interrupts and SIGTERM (how a command ends); `main`
    options.py   the options several commands share, declared once (the reference model's, the
                 checkpoint inputs'), and reading them (formats, the typed command line)
    render.py    what the commands print (the diagnose report's sentences come from report.py)
    <command>.py one thin module per command: options -> the job's spec -> the job -> render

Heavy modules (torch, matplotlib, transformers) are imported inside the commands so that
`residual-probe --help` answers at once. Every command writes its artifacts under `--out`.
"""

from . import bounds, collapse, diagnose, figures, grad_norms, plot, train
from .app import app, main

# registered here, in the order `--help` lists them
for _name, _command in (
    ("grad-norms", grad_norms.grad_norms),
    ("train", train.train),
    ("figures", figures.figures),
    ("bounds", bounds.bounds),
    ("collapse", collapse.collapse),
    ("diagnose", diagnose.diagnose),
    ("plot", plot.plot),
):
    app.command(_name)(_command)

__all__ = ["app", "main"]
