"""Repository hygiene: no pickle-based deserialisation in our own sources, and bounded dependencies.

1. Pickle runs code on load. DESIGN.md: weights are safetensors, config is JSON/YAML, never pickle.
   An ``ast`` scan of models/, training/, service/, scripts/ and tests/ flags: pickle-family imports
   (pickle, cPickle, _pickle, dill, cloudpickle, shelve), their loaders (``pickle.load(s)``,
   ``pickle.Unpickler(...)``, ``joblib.load``, ``shelve.open``, ``pandas.read_pickle``),
   ``torch.load`` without ``weights_only=True``, ``torch.save`` (writes a pickle), any
   ``allow_pickle=`` other than False (``np.load`` ...), and YAML loaders that build Python objects
   (``yaml.load`` without a safe loader, ``yaml.unsafe_load``, ``yaml.full_load``). Names are
   resolved through the file's imports (``import numpy as np``, ``from torch import load``).
   The few deliberate uses are listed in ``EXEMPT`` (file + the one module or function), each with
   its reason; an exemption that matches nothing fails.
2. pyproject.toml: every requirement, of the project and of every extra, has an upper bound
   (``<``, ``<=``, ``~=`` or ``==``), and the versions installed here (what the tests ran with)
   satisfy them.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("models", "training", "service", "scripts", "tests")

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve"}
UNSAFE_CALLS = {
    **{f"{m}.{f}": "unpickles" for m in PICKLE_MODULES - {"shelve"} for f in ("load", "loads", "Unpickler")},
    "shelve.open": "shelve unpickles its values",
    "joblib.load": "joblib.load unpickles",
    "pandas.read_pickle": "read_pickle unpickles",
    "torch.save": "torch.save writes a pickle; weights are safetensors",
    "yaml.unsafe_load": "builds arbitrary Python objects",
    "yaml.unsafe_load_all": "builds arbitrary Python objects",
    "yaml.full_load": "FullLoader builds Python objects; use yaml.safe_load",
    "yaml.full_load_all": "FullLoader builds Python objects; use yaml.safe_load_all",
}
SAFE_YAML_LOADERS = ("SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader")

# (path, what: the module imported or the function called) -> why this use is deliberate and safe.
# Keep it short; every entry must still match something.
EXEMPT = {
    ("training/sources.py", "pickle"): "subclasses pickle.Unpickler with a find_class that admits "
    "only numpy's array reconstruction (datasets published as gzipped pickles); never pickle.load",
    ("tests/test_data_sources.py", "pickle"): "pickle.dumps hostile payloads to prove that "
    "restricted Unpickler refuses them",
    ("tests/test_train_loop.py", "torch.save"): "writes a .pth fixture to test that --pretrained reads "
    "one with torch.load(weights_only=True)",
}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    rule: str
    what: str  # the module imported or the function called
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.detail}"


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the module path it stands for, from every import in the file."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _is_false(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def scan_source(source: str, path: str = "<snippet>") -> list[Finding]:
    tree = ast.parse(source, filename=path)
    aliases = _aliases(tree)
    out: list[Finding] = []

    def add(node: ast.AST, rule: str, what: str | None, detail: str) -> None:
        out.append(Finding(path, getattr(node, "lineno", 0), rule, what or "?", detail))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PICKLE_MODULES:
                    add(node, "pickle-import", a.name.split(".")[0], f"import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PICKLE_MODULES:
            add(node, "pickle-import", node.module.split(".")[0], f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            dotted = _dotted(node.func)
            name = None
            if dotted is not None:
                head, _, rest = dotted.partition(".")
                name = ".".join(p for p in (aliases.get(head, head), rest) if p)
                name = name.replace("pd.", "pandas.", 1) if name.startswith("pd.") else name
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            if name in UNSAFE_CALLS:
                add(node, "pickle-load", name, f"{name}(): {UNSAFE_CALLS[name]}")
            elif name is not None and name.endswith(".read_pickle"):
                add(node, "pickle-load", name, f"{name}(): read_pickle unpickles")
            elif name == "torch.load" and not _is_true(kw.get("weights_only")):
                add(node, "torch-load", name, "torch.load() without weights_only=True")
            elif name in ("yaml.load", "yaml.load_all"):
                loader = kw.get("Loader", node.args[1] if len(node.args) > 1 else None)
                loader_name = _dotted(loader) if loader is not None else None
                if loader_name is None or not loader_name.endswith(SAFE_YAML_LOADERS):
                    add(node, "yaml-load", name, f"{name}() without a safe Loader (got {loader_name})")
            if "allow_pickle" in kw and not _is_false(kw["allow_pickle"]):
                add(node, "allow-pickle", name, f"{name or 'call'}(allow_pickle=...) other than False")
    return out


def scan_tree(root: Path, dirs: tuple[str, ...] = SCANNED) -> list[Finding]:
    found = []
    for d in dirs:
        for f in sorted((root / d).rglob("*.py")):
            if ".venv" in f.parts or "__pycache__" in f.parts:
                continue
            found += scan_source(f.read_text(encoding="utf-8"), f.relative_to(root).as_posix())
    return found


# -- 1. pickle ------------------------------------------------------------------------------
def test_our_sources_deserialise_nothing_with_pickle():
    found = scan_tree(ROOT)
    bad = [f for f in found if (f.path, f.what) not in EXEMPT]
    assert not bad, "pickle-based loading (see tests/test_hygiene.py):\n" + "\n".join(map(str, bad))
    used = {(f.path, f.what) for f in found}
    stale = [k for k in EXEMPT if k not in used]
    assert not stale, f"exemptions that no longer match anything (remove them): {stale}"


BAD = {
    "import pickle": "import pickle\n",
    "import cPickle": "import cPickle as p\n",
    "from pickle import loads": "from pickle import loads\n",
    "import dill": "import dill\n",
    "import shelve": "import shelve\n",
    "import _pickle": "import _pickle\n",
    "pickle.load via alias": "import pickle as pk\nx = pk.load(f)\n",
    "joblib.load": "import joblib\nm = joblib.load('m.pkl')\n",
    "from joblib import load": "from joblib import load\nm = load('m.pkl')\n",
    "torch.load bare": "import torch\nsd = torch.load('w.pt')\n",
    "torch.load weights_only=False": "import torch\nsd = torch.load('w.pt', weights_only=False)\n",
    "torch.load weights_only=variable": "import torch\nsd = torch.load(p, weights_only=flag)\n",
    "from torch import load": "from torch import load\nsd = load('w.pt', map_location='cpu')\n",
    "torch.save": "import torch\ntorch.save(sd, 'w.pt')\n",
    "np.load allow_pickle": "import numpy as np\na = np.load('a.npy', allow_pickle=True)\n",
    "numpy.load allow_pickle variable": "import numpy\na = numpy.load(p, allow_pickle=ok)\n",
    "pd.read_pickle": "import pandas as pd\ndf = pd.read_pickle('d.pkl')\n",
    "pandas.read_pickle": "import pandas\ndf = pandas.read_pickle('d.pkl')\n",
    "yaml.load no Loader": "import yaml\nc = yaml.load(text)\n",
    "yaml.load unsafe Loader": "import yaml\nc = yaml.load(text, Loader=yaml.Loader)\n",
    "yaml.load positional UnsafeLoader": "import yaml\nc = yaml.load(text, yaml.UnsafeLoader)\n",
    "yaml.unsafe_load": "import yaml\nc = yaml.unsafe_load(text)\n",
    "yaml.full_load": "import yaml\nc = yaml.full_load(text)\n",
    "from yaml import load": "from yaml import load\nc = load(text)\n",
    "inside a function": "def f(p):\n    import torch\n    return torch.load(p)\n",
}
GOOD = {
    "torch.load weights_only": "import torch\nsd = torch.load('w.pt', map_location='cpu', weights_only=True)",
    "np.load default": "import numpy as np\na = np.load('a.npz')\n",
    "np.load allow_pickle=False": "import numpy as np\na = np.load('a.npy', allow_pickle=False)\n",
    "yaml.safe_load": "import yaml\nc = yaml.safe_load(text)\n",
    "yaml.load SafeLoader": "import yaml\nc = yaml.load(text, Loader=yaml.SafeLoader)\n",
    "yaml.load CSafeLoader positional": "import yaml\nc = yaml.load(text, yaml.CSafeLoader)\n",
    "safetensors": "from safetensors.torch import load_file, save_file\nsd = load_file('w.safetensors')\n",
    "joblib.Parallel": "from joblib import Parallel, delayed\n",
    "a string mentioning pickle": "doc = 'never import pickle; torch.load(p) is banned'\n",
    "json": "import json\nc = json.loads(text)\n",
    "other .load methods": "img = Image.open(p)\nimg.load()\nwith open(p) as f:\n    d = json.load(f)\n",
}


@pytest.mark.parametrize("name", list(BAD))
def test_the_scanner_flags_each_pickle_pattern(name):
    assert scan_source(BAD[name]), f"not flagged: {BAD[name]!r}"


@pytest.mark.parametrize("name", list(GOOD))
def test_the_scanner_leaves_safe_code_alone(name):
    assert scan_source(GOOD[name]) == []


def test_a_pickle_load_introduced_in_the_tree_fails_the_scan(tmp_path):
    """What the repo test does, on a copy with one bad file: it is found, by path and line; and an
    exempt file that starts calling pickle.loads is caught too (only its import is exempt)."""
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "ok.py").write_text("import json\n")
    (tmp_path / "service" / "bad.py").write_text("import numpy as np\n\nx = np.load(p, allow_pickle=True)\n")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "sources.py").write_text("import pickle\nobj = pickle.loads(blob)\n")
    found = scan_tree(tmp_path, ("service", "training"))
    assert [(f.path, f.line, f.rule) for f in found if (f.path, f.what) not in EXEMPT] == [
        ("service/bad.py", 3, "allow-pickle"),
        ("training/sources.py", 2, "pickle-load"),
    ]


# -- 2. dependency bounds -------------------------------------------------------------------
UPPER = ("<", "<=", "~=", "==", "===")


def requirements() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"(dependencies)": project.get("dependencies", []), **project.get("optional-dependencies", {})}


def unbounded(reqs: list[str]) -> list[str]:
    return [r for r in reqs if not any(s.operator in UPPER for s in Requirement(r).specifier)]


def test_every_requirement_has_an_upper_bound():
    bad = {extra: unbounded(reqs) for extra, reqs in requirements().items()}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"requirements without an upper bound (<, ~= or ==) in pyproject.toml: {bad}"


def test_the_bound_check_itself():
    assert unbounded(["a>=1", "b", "c>=1,<2", "d~=1.2", "e==1.0", "f<=2; sys_platform != 'win32'"]) == [
        "a>=1",
        "b",
    ]


def test_installed_versions_satisfy_the_declared_ranges():
    """The ranges must admit what this environment tested (extras not installed here are skipped)."""
    outside = []
    for extra, reqs in requirements().items():
        for r in map(Requirement, reqs):
            if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                continue
            try:
                installed = metadata.version(r.name)
            except metadata.PackageNotFoundError:
                continue
            if not r.specifier.contains(installed, prereleases=True):
                outside.append(f"[{extra}] {r} but {r.name} {installed} is installed")
    assert not outside, "\n".join(outside)
