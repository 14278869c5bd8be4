"""The `ddpm` command: thin Typer commands that parse arguments, then call one function each.

    app.py       the Typer app, the config a command starts from, and `main` (errors as one line, exit 2)
    training.py  ddpm config, ddpm schedule, ddpm train
    sampling.py  ddpm sample, ddpm eval, ddpm export
    editing.py   ddpm inpaint, ddpm edit, ddpm interpolate
"""

from ddpm_mnist.cli import editing, sampling, training
from ddpm_mnist.cli.app import app, main

app.command()(training.config)
app.command()(training.schedule)
app.command()(training.train)
app.command()(sampling.sample)
app.command("eval")(sampling.eval_)
app.command()(sampling.export)
app.command()(editing.inpaint)
app.command()(editing.edit)
app.command()(editing.interpolate)

__all__ = ["app", "main"]
