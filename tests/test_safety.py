"""Safe by default: weights load only through safetensors or torch.load(weights_only=True),
nothing unpickles, and servers bind to loopback."""

import ast
import shlex
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("xfusion", "eval", "benchmarks")


def _sources():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            yield node, owner, name


def test_torch_load_always_weights_only_and_no_pickle_load():
    offenders = []
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, owner, name in _calls(tree):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if owner == "torch" and name == "load":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    offenders.append(f"{where} torch.load without weights_only=True")
            if owner in ("pickle", "dill", "cloudpickle", "joblib") and name in ("load", "loads"):
                offenders.append(f"{where} {owner}.{name}")
    assert not offenders, "unsafe loading:\n" + "\n".join(offenders)


def test_the_scan_sees_the_packages():
    # Guards the test above against silently scanning nothing (e.g. after a move).
    assert sum(1 for _ in _sources()) >= 5


def _host(argv: list[str]) -> str | None:
    """The address an `mlflow ui|server` command line binds (`--host H`, `--host=H`, `-h H`)."""
    for i, arg in enumerate(argv):
        if arg in ("--host", "-h") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return None


def test_mlflow_ui_target_binds_to_loopback():
    """`make mlflow-ui` runs `mlflow ui` on 127.0.0.1: read from make's own dry run, so a
    dropped or renamed target, a lost command or another host fails here."""
    make = shutil.which("make")
    assert make, "make is not installed: the Makefile is the documented entry point"
    proc = subprocess.run([make, "-n", "mlflow-ui"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line) for line in proc.stdout.splitlines() if "mlflow" in line]
    servers = [c for c in commands if Path(c[0]).name == "mlflow" and c[1:2] == ["ui"]]
    assert len(servers) == 1, f"make -n mlflow-ui runs no single `mlflow ui`:\n{proc.stdout}"
    assert _host(servers[0]) == "127.0.0.1", servers[0]


def test_every_server_in_the_makefile_binds_to_loopback():
    lines = [line for line in (ROOT / "Makefile").read_text().splitlines()
             if "mlflow ui" in line or "mlflow server" in line]
    assert lines, "no `mlflow ui` line in the Makefile (the mlflow-ui target)"
    for line in lines:
        assert _host(shlex.split(line.strip())) == "127.0.0.1", line
