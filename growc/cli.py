"""The `growc` command: parses options, calls the same functions as the Python API, prints."""

from __future__ import annotations

import json
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from growc.errors import GrowcError, GrowcWarning
from growc.growth.config import GrowthConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Grow neural networks from tiny to just-big-enough, and ship them as ONNX.",
)
console = Console(stderr=False)
errors = Console(stderr=True)


class RichObserver:
    """Shows a progress bar per epoch and a table per growth step."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.progress: Progress | None = None
        self.task = None

    def run_start(self, sites, params: int) -> None:
        if self.quiet:
            return
        console.print(f"[bold]growth sites[/]: {', '.join(s.name for s in sites)}  ·  {params:,} parameters")

    def epoch_start(self, step: int, epoch: int, epochs: int, batches: int) -> None:
        if self.quiet or not console.is_terminal:  # piped: a bar only leaves blank lines behind
            return
        self.progress = Progress(
            TextColumn(f"step {step} epoch {epoch + 1}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=batches or None)

    def batch_end(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def epoch_end(self, step: int, epoch: int, train_loss: float) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def step_end(self, record) -> None:
        if self.quiet:
            return
        console.print(step_table(record, console.width))
        for g in record.grown:  # a site whose significant neurons did not all go in says why
            if g.reason:
                console.print(f"[dim]{g.site}[/]: {g.reason}", highlight=False)
        if record.note:
            console.print(f"[yellow]{record.note}[/]")

    def message(self, text: str) -> None:
        if not self.quiet:
            console.print(text)


#: The per-step table's columns: (header, justify). Headers are short so that at 80 columns every
#: number keeps its full width; site names fold instead.
STEP_COLUMNS = (
    ("site", "left"),
    ("width", "right"),
    ("bottleneck", "right"),
    ("rel.", "right"),
    ("sig.", "right"),
    ("added", "right"),
    ("gamma", "right"),
    ("pred.\ngain", "right"),
    ("obs.\ngain", "right"),
)


def _step_rows(record) -> list[list[str]]:
    grown = {g.site: g for g in record.grown}
    rows = []
    for site, width in record.widths.items():
        b = record.bottlenecks.get(site, {})
        g = grown.get(site)
        rows.append(
            [
                site,
                str(width),
                f"{b['bottleneck']:.3g}" if b else "-",
                f"{b['relative']:.2f}" if b else "-",
                str(b.get("significant", "-")),
                str(g.neurons) if g else "0",
                f"{g.gamma:.3g}" if g else "-",
                f"{g.predicted_gain:.3g}" if g else "-",
                f"{g.observed_gain:.3g}" if g else "-",
            ]
        )
    return rows


#: Dropped, in this order, when the terminal is too narrow for every number at full width.
OPTIONAL_STEP_COLUMNS = ("sig.", "rel.")
SITE_MIN_WIDTH = 8  # a site name narrower than this folds into too many lines


def _fitting_columns(widths: dict[str, int], limit: int) -> tuple[list[str], int]:
    """The step table's columns that fit in `limit` characters (two between columns), dropping
    the optional ones first, and the width left for the site names."""
    kept = list(widths)
    for name in (None, *OPTIONAL_STEP_COLUMNS):
        if name is not None:
            kept.remove(name)
        numbers = sum(widths[c] for c in kept if c != "site") + 2 * (len(kept) - 1)
        if SITE_MIN_WIDTH + numbers <= limit:
            break
    return kept, max(SITE_MIN_WIDTH, min(widths["site"], limit - numbers))


def step_table(record, width: int = 80) -> Table:
    """One growth step: each site's width, bottleneck and what was added, for a terminal `width`
    wide. A light frame, number columns as wide as their longest value (site names fold), and
    fewer columns on a narrow terminal, so no number is cut."""
    acc = f"{record.val_accuracy:.2%}" if record.val_accuracy is not None else "n/a"
    title = (
        f"step {record.step}: {record.params:,} params, train loss {record.train_loss:.4f}, "
        f"val loss {record.val_loss:.4f}, val acc {acc}"
    )
    rows = _step_rows(record)
    longest = {
        header: max([len(line) for line in header.split("\n")] + [len(row[i]) for row in rows])
        for i, (header, _) in enumerate(STEP_COLUMNS)
    }
    kept, site_width = _fitting_columns(longest, width)
    table = Table(
        title=title,
        title_justify="left",
        min_width=min(len(title), width),  # as wide as the title when the terminal allows: one line
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
        pad_edge=False,
    )
    for header, justify in STEP_COLUMNS:
        if header not in kept:
            continue
        table.add_column(
            header,
            justify=justify,
            overflow="fold",  # never "…": a value too long for the terminal goes on to the next line
            width=site_width if header == "site" else longest[header],
        )
    columns = [i for i, (header, _) in enumerate(STEP_COLUMNS) if header in kept]
    for row in rows:
        table.add_row(*[row[i] for i in columns])
    return table


def summary_table(report: dict) -> Table:
    """Each site's width from start to end; parameters, multiply-adds and accuracy before and after."""
    final = report.get("final", {})
    table = Table(title="growth summary", title_justify="left")
    for column in ("", "start", "end"):
        table.add_column(column, justify="right" if column else "left")
    start_widths = final.get("initial_widths", {})
    for site, width in final.get("widths", {}).items():
        table.add_row(f"width of {site}", str(start_widths.get(site, 0)), str(width))
    table.add_row("parameters", f"{final.get('initial_params', 0):,}", f"{final.get('final_params', 0):,}")
    if "initial_flops" in final:
        table.add_row("multiply-adds / sample", f"{final['initial_flops']:,}", f"{final['final_flops']:,}")
    first, last = final.get("first_val_accuracy"), final.get("final_val_accuracy")
    if first is not None and last is not None:
        table.add_row("validation accuracy", f"{first:.2%}", f"{last:.2%}")
    return table


def _terminate_as_interrupt() -> None:
    """SIGTERM (a scheduler stopping the job) ends the run like Ctrl-C: a message, the last step's
    checkpoint kept (checkpoints are written atomically after every step)."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _fail(message: str, code: int = 2) -> None:
    errors.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.command()
def grow(
    model_file: Annotated[Path, typer.Argument(help="Python file defining `model` (and optionally `data`, `loss`)")],
    data: Annotated[
        str,
        typer.Option(
            help="built-in data set when the file defines no `data`: digits, mnist:PATH, cifar10:PATH, mnist1d"
        ),
    ] = "digits",
    epochs: Annotated[
        float, typer.Option(min=0.0, help="training epochs between growth steps (a fraction: that share of an epoch)")
    ] = GrowthConfig.epochs,
    final_epochs: Annotated[
        int, typer.Option(min=0, help="training epochs after the last growth step")
    ] = GrowthConfig.final_epochs,
    steps: Annotated[int, typer.Option(min=0, help="maximum number of growth steps")] = GrowthConfig.steps,
    max_params: Annotated[Optional[int], typer.Option(min=1, help="never grow past this many parameters")] = None,
    strategy: Annotated[str, typer.Option(help="new neurons from: tiny, random, gradmax")] = GrowthConfig.strategy,
    depth: Annotated[
        bool, typer.Option(help="also consider new residual blocks on the edges into layers")
    ] = GrowthConfig.depth,
    max_flops: Annotated[
        Optional[int], typer.Option(min=1, help="stop growing at this many multiply-adds per sample")
    ] = None,
    target_accuracy: Annotated[
        Optional[float], typer.Option(min=0.0, max=1.0, help="stop growing at this validation accuracy (0-1)")
    ] = None,
    time_budget: Annotated[Optional[float], typer.Option(min=0.0, help="stop growing after this many seconds")] = None,
    trigger: Annotated[
        str, typer.Option(help="grow after --epochs epochs (epochs) or once validation loss plateaus (plateau)")
    ] = GrowthConfig.trigger,
    resume: Annotated[bool, typer.Option(help="continue the run whose checkpoint is in --out")] = False,
    lr: Annotated[float, typer.Option(min=0.0, help="learning rate")] = GrowthConfig.lr,
    weight_decay: Annotated[
        float, typer.Option(min=0.0, help="L2 penalty on the weights (0 to turn it off)")
    ] = GrowthConfig.weight_decay,
    optimizer: Annotated[str, typer.Option(help="adam or sgd")] = GrowthConfig.optimizer,
    batch_size: Annotated[int, typer.Option(min=1)] = GrowthConfig.batch_size,
    seed: Annotated[int, typer.Option()] = GrowthConfig.seed,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N")] = GrowthConfig.device,
    out: Annotated[Optional[Path], typer.Option(help="output folder (default: runs/<model file name>/)")] = None,
    leaf: Annotated[
        Optional[list[str]], typer.Option(help="submodule (path or class name) to keep opaque when tracing")
    ] = None,
    concrete: Annotated[
        Optional[list[str]],
        typer.Option(help="NAME=VALUE: fix a forward argument while tracing (VALUE is a Python literal)"),
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 18,
    quiet: Annotated[bool, typer.Option(help="print only the summary")] = False,
) -> None:
    """Grow MODEL_FILE's model by its expressivity bottlenecks, then export it to ONNX."""
    from growc.api import default_out, grow_file
    from growc.growth.distributed import environment_rank

    out = out or default_out(model_file)
    checkpoint = out / "model.safetensors"
    previous = _mtime(checkpoint)  # a checkpoint already there is an earlier run's, until rewritten
    _terminate_as_interrupt()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", GrowcWarning)
            warnings.showwarning = _show_warning
            result = grow_file(
                model_file,
                data=data,
                out=out,
                epochs=epochs,
                final_epochs=final_epochs,
                steps=steps,
                max_params=max_params,
                strategy=strategy,
                depth=depth,
                max_flops=max_flops,
                target_accuracy=target_accuracy,
                time_budget=time_budget,
                trigger=trigger,
                resume=resume,
                lr=lr,
                weight_decay=weight_decay,
                optimizer=optimizer,
                batch_size=batch_size,
                seed=seed,
                device=device,
                leaf_modules=leaf or [],
                concrete_args=_concrete_args(concrete or []),
                opset=opset,
                observer=RichObserver(quiet or environment_rank() != 0),  # under torchrun rank 0 prints
            )
    except GrowcError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail(_interrupted(checkpoint, resume, previous), code=130)
    if environment_rank() != 0:
        return
    final = result.report.final
    if not quiet:
        console.print(summary_table(result.report.to_dict()))
    acc = final.get("final_val_accuracy")
    console.print(
        f"[bold green]done[/]: {final['initial_params']:,} -> {final['final_params']:,} parameters, "
        f"widths {final['widths']}, val acc {acc:.2%}"
        if acc is not None
        else f"[bold green]done[/]: {final}"
    )
    console.print(
        f"wrote {out}/model.onnx (onnxruntime max |diff| {final['onnx_max_abs_diff']:.1e}, {final['onnx_relative_diff']:.1e} of the output's scale), {out}/model.safetensors, {out}/report.json"
    )


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """growc's warnings as one line on stderr; any other warning as Python prints it."""
    if issubclass(category, GrowcWarning):
        errors.print(f"[bold yellow]warning:[/] {message}", highlight=False)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


def _interrupted(checkpoint: Path, resume: bool, previous: int | None) -> str:
    """What Ctrl-C leaves: the run's last checkpoint (this run's, or the resumed one), or, before
    the first step completed, nothing."""
    now = _mtime(checkpoint)
    kept = now is not None and (resume or now != previous)
    if kept:
        return (
            f"interrupted: the last completed step's checkpoint is {checkpoint}; "
            "continue with the same command and --resume"
        )
    return "interrupted before the first growth step completed: nothing was kept; run the command again"


def _concrete_args(pairs: list[str]) -> dict:
    """--concrete NAME=VALUE options as torch.fx concrete_args."""
    import ast

    args = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.isidentifier():
            raise GrowcError(f"--concrete takes NAME=VALUE, e.g. --concrete training=False (got '{pair}')")
        try:
            args[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise GrowcError(
                f"--concrete {name}: '{value}' is not a Python literal (True, 3, 'mean', None ...)"
            ) from None
    return args


@app.command()
def inspect(
    model_file: Annotated[Path, typer.Argument(help="Python file defining `model`")],
    leaf: Annotated[Optional[list[str]], typer.Option(help="submodule to keep opaque when tracing")] = None,
) -> None:
    """List the growth sites growc finds in MODEL_FILE's model, and what it cannot grow and why;
    for an .onnx file, what it holds and its onnxruntime latency."""
    from growc.api import candidates_of
    from growc.userfile import load_user_file

    if model_file.suffix == ".onnx":
        _inspect_onnx(model_file)
        return
    try:
        user = load_user_file(model_file)
        report = candidates_of(user.model, leaf_modules=leaf or [])
    except GrowcError as exc:
        _fail(str(exc))
    from growc.graph.candidates import describe_ties, site_kind

    graph = report.graph  # the model growth works on (functional layers lifted)
    table = Table(title=f"growth candidates of {model_file}", title_justify="left")
    for column in ("site", "kind", "layers tied", "width", "params / neuron", "activation"):
        table.add_column(column)
    for site in report.sites:
        table.add_row(
            site.name,
            site_kind(site),
            describe_ties(site),
            str(site.width(graph)),
            str(site.params_per_neuron(graph)),
            site.activation,
        )
    for edge in report.depth:
        table.add_row(
            edge.name,
            "depth",
            f"a new block on the edge into {edge.consumer}",
            "0",
            str(edge.params_per_neuron(graph)),
            edge.activation,
        )
    console.print(table)
    for name, why in report.skipped:
        console.print(f"[dim]not growable[/] {name}: {why}")


def _inspect_onnx(path: Path) -> None:
    from growc.deploy.onnx_info import describe_onnx

    try:
        info = describe_onnx(path)
    except GrowcError as exc:
        _fail(str(exc))
    table = Table(title=f"{path}: {info.size_bytes:,} bytes, opset {info.opset}", title_justify="left")
    for column in ("", "name", "shape", "type"):
        table.add_column(column)
    for kind, values in (("input", info.inputs), ("output", info.outputs)):
        for name, shape, element in values:
            table.add_row(kind, name, str(shape), element)
    console.print(table)
    console.print(f"{info.parameters:,} weights; ops: " + ", ".join(f"{op} x{n}" for op, n in info.ops.most_common()))
    card = info.card or {}
    recorded = card.get("latency_ms") or {}
    torch_ms = {b: (recorded.get(f"batch_{b}") or {}).get("torch_eager") for b in info.latency_ms}
    latency = Table(title="latency, median ms per call (CPU)", title_justify="left")
    for column in ("batch", "onnxruntime (now)", "torch eager (model card)"):
        latency.add_column(column)
    for batch, ms in info.latency_ms.items():
        eager = torch_ms.get(batch)
        latency.add_row(str(batch), f"{ms:.3f}", f"{eager:.3f}" if isinstance(eager, (int, float)) else "-")
    console.print(latency)
    if card.get("accuracy") is not None:
        console.print(f"model card: validation accuracy {card['accuracy']:.2%}")


@app.command()
def report(out: Annotated[Path, typer.Argument(help="a growth run's output folder")]) -> None:
    """Print the summary of a finished or interrupted run."""
    path = out / "report.json" if out.is_dir() else out
    if not path.is_file():
        _fail(f"no report.json in '{out}': give the --out folder of a growc grow run")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        _fail(f"'{path}' is not valid JSON ({exc})")

    def number(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)  # null: a NaN or infinity of the run

    table = Table(title=f"growth run {out}", title_justify="left")
    for column in ("step", "params", "train loss", "val loss", "val acc", "widths", "grown"):
        table.add_column(column)
    for s in data.get("steps", []):
        grown = ", ".join(f"{g['site']}+{g['neurons']}" for g in s.get("grown", []) if g["neurons"]) or "-"
        table.add_row(
            str(s["step"]),
            f"{s['params']:,}",
            number(s.get("train_loss"), ".4f"),
            number(s.get("val_loss"), ".4f"),
            number(s.get("val_accuracy"), ".2%"),
            json.dumps(s["widths"]),
            grown,
        )
    console.print(table)
    # Reports from before the status field were written once, at the end of a run.
    finished = data.get("status", "finished" if data.get("final") else "running") == "finished"
    if finished and data.get("final"):
        console.print(summary_table(data))
    else:
        console.print("[yellow]the run has not finished: its last completed step is above[/]")
    if data.get("stop_reason"):
        console.print(f"stopped: {data['stop_reason']}")


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="a growc checkpoint (.safetensors written by growc)")],
    out: Annotated[Optional[Path], typer.Option(help="output folder (default: <checkpoint folder>/deploy)")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 18,
    int8: Annotated[str, typer.Option(help="int8 file too: none, dynamic (no calibration) or static (QDQ)")] = "none",
    int8_tolerance: Annotated[
        float, typer.Option(help="largest accuracy loss of the int8 file, in accuracy points")
    ] = 0.5,
    data: Annotated[
        Optional[str],
        typer.Option(
            help="validation/calibration data: digits, mnist:PATH, cifar10:PATH, mnist1d, or a model file's data() "
            "(MODEL.py); default: the data the run was grown on"
        ),
    ] = None,
    preprocessing: Annotated[
        Optional[str], typer.Option(help="how inputs are prepared, for the model card (default: the data set's)")
    ] = None,
) -> None:
    """Freeze CHECKPOINT's model for inference; write ONNX (+ int8), model cards and a standalone model.py."""
    from growc.deploy.pipeline import export_checkpoint

    try:
        result = export_checkpoint(
            checkpoint,
            out=out,
            opset=opset,
            int8=int8,
            int8_tolerance=int8_tolerance,
            data=data,
            preprocessing=preprocessing,
        )
    except GrowcError as exc:
        _fail(str(exc))

    def pct(value: float | None) -> str:
        return f"{value:.2%}" if value is not None else "n/a"

    console.print(
        f"[bold green]done[/]: {result.params_before:,} -> {result.params_after:,} parameters after freezing, "
        f"fp32 acc {pct(result.fp32_accuracy)}"
    )
    files = [result.onnx.path, *result.cards] + ([result.int8.path] if result.int8 else [])
    if result.standalone is not None:
        files.append(result.standalone.parent)
    table = Table(title="latency (median ms)", title_justify="left")
    for column in ("file", "batch", "onnxruntime", "torch eager"):
        table.add_column(column, justify="right" if column != "file" else "left")
    for name, rows in (("model.onnx", result.latency), ("model.int8.onnx", result.int8_latency)):
        for r in rows:
            table.add_row(name, str(r.batch), f"{r.onnxruntime_ms:.3f}", f"{r.torch_ms:.3f}")
    console.print(table)
    if result.int8 is not None:
        q = result.int8
        console.print(
            f"int8 ({q.mode}): {q.int8_bytes:,} bytes vs {q.fp32_bytes:,} fp32 ({q.size_ratio:.2f}x smaller), "
            f"acc {pct(q.int8_accuracy)} vs {pct(q.fp32_accuracy)}"
            + (f"; kept in float to stay within tolerance: {', '.join(q.float_layers)}" if q.float_layers else "")
        )
    console.print("wrote " + ", ".join(str(f) for f in files))


def main() -> None:
    try:
        app()
    except GrowcError as exc:  # anything that escaped a command
        errors.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
