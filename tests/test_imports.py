"""Import costs users feel: `growc --help` and the method's own modules load without the pipeline."""

import subprocess
import sys


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_cli_module_does_not_import_torch():
    loaded = _loaded_after("import growc.cli")
    assert "torch" not in loaded
    assert "onnx" not in loaded


def test_growc_help_prints_the_commands_without_torch():
    code = (
        "import sys\n"
        "from growc.cli import app\n"
        "try:\n"
        "    app(['--help'], prog_name='growc')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "assert 'torch' not in sys.modules, 'growc --help imported torch'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for command in ("grow", "inspect", "report", "export"):
        assert command in out.stdout


def test_the_solver_imports_alone():
    loaded = {m for m in _loaded_after("import growc.tiny.solver") if m.startswith("growc")}
    assert loaded <= {"growc", "growc.tiny", "growc.tiny.solver", "growc.errors"}, loaded


def test_the_public_names_resolve_lazily():
    import growc

    for name in growc.__all__:
        assert getattr(growc, name) is not None
    assert "grow" in dir(growc)


def test_every_public_name_is_listed_once():
    import growc

    assert sorted(growc.__all__) == sorted(growc._EXPORTS)


def test_the_method_and_the_graph_import_without_each_other_or_the_pipeline():
    """tiny/ (the math) and graph/ (tracing, sites, rewriting) stand alone: neither loads the
    other, the growth loop, deployment, the API or the CLI."""
    pipeline = ("growc.growth", "growc.deploy", "growc.api", "growc.cli")
    for modules, other in [
        ("growc.tiny.significance, growc.tiny.strategies", "growc.graph"),
        ("growc.graph.candidates, growc.graph.depth", "growc.tiny"),
    ]:
        loaded = {m for m in _loaded_after(f"import {modules}") if m.startswith("growc")}
        assert not {m for m in loaded if m.startswith((*pipeline, other))}, (modules, sorted(loaded))
