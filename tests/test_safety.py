"""Safe by default: weights load only through safetensors or torch.load(weights_only=True),
nothing unpickles, and servers bind to loopback."""

import ast
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


def test_servers_bind_to_loopback():
    makefile = (ROOT / "Makefile").read_text()
    for line in makefile.splitlines():
        if "mlflow ui" in line or "mlflow server" in line:
            assert "--host 127.0.0.1" in line, line
