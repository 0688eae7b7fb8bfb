"""Dependencies run one way: calibration -> vllm_dpq, never back (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def test_vllm_dpq_never_imports_calibration_or_benchmarks():
    """Static: no module of the serving package names calibration or benchmarks, even lazily."""
    bad = {f"{p.relative_to(ROOT)}: {m}" for p in (ROOT / "vllm_dpq").rglob("*.py")
           for m in imported_modules(p) if m.split(".")[0] in ("calibration", "benchmarks")}
    assert not bad, sorted(bad)


def test_vllm_dpq_imports_and_runs_with_calibration_unimportable(tmp_path):
    """Dynamic: with calibration made unimportable, every vllm_dpq module imports (the plugin
    too, when vLLM is installed) and `vllm-dpq inspect` validates a checkpoint."""
    from conftest import make_checkpoint

    ckpt, _ = make_checkpoint(tmp_path / "ckpt")
    modules = sorted({".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                      for p in (ROOT / "vllm_dpq").rglob("*.py")})
    try:
        import vllm  # noqa: F401
    except ImportError:
        modules = [m for m in modules if not m.startswith("vllm_dpq.plugin.")]
    code = (
        "import importlib, sys\n"
        "sys.modules['calibration'] = None\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "from vllm_dpq.cli import main\n"
        f"sys.exit(main(['inspect', {str(ckpt)!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "quantized layers" in r.stdout
    assert len(modules) > 20  # the walk found the package


@pytest.mark.parametrize("package", ["vllm_dpq", "calibration", "benchmarks"])
def test_no_source_file_over_400_lines_without_a_reason(package):
    """Files hold one idea each; a longer one says why at its top (a line starting "Length:")."""
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in (ROOT / package).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400 and "Length:" not in p.read_text()[:3000]]
    assert not long, long
