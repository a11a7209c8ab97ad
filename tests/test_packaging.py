"""What a user installs is what we test.

The wheel is built from the checkout, installed into a temporary directory
(no editable install, no source tree on the path) and trains a small model
with `with_fisher` + `Ginger` from outside the checkout, on the current
backend. Every module imports on its own, in any order, in a fresh process.
"""

import ast
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "keras_ginger"
BACKEND = keras.backend.backend()
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(
        ".__init__")
    for p in PACKAGE.rglob("*.py")
)
# Modules that import one backend's framework at import time.
BACKEND_ONLY = {
    "keras_ginger.tf_distribute": "tensorflow",
    "keras_ginger.torch_distributed": "torch",
    "keras_ginger.trainers.jax_trainer": "jax",
    "keras_ginger.trainers.tensorflow_trainer": "tensorflow",
    "keras_ginger.trainers.torch_trainer": "torch",
}

TRAIN = """
import os, sys
import numpy as np
import keras
import keras_ginger
site = sys.argv[1]
for name, module in list(sys.modules.items()):
    if name.startswith("keras_ginger"):
        assert os.path.realpath(module.__file__).startswith(site), (name, module.__file__)
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.standard_normal((64, 6)).astype("float32")
y = (x[:, 0] > 0).astype("int32")
model = keras.Sequential([keras.Input((6,)),
                          keras.layers.Dense(8, activation="tanh"),
                          keras.layers.Dense(2)])
model = keras_ginger.with_fisher(model)
model.compile(optimizer=keras_ginger.Ginger(tau=4),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
h = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
assert h.history["loss"][-1] < h.history["loss"][0], h.history
assert isinstance(model, keras_ginger.FisherTrainStep)
print("trained", keras.backend.backend(), h.history["loss"][-1])
"""


def _run(args, **kwargs):
    proc = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    # A copy of the checkout: the build writes build/ and *.egg-info.
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", "results",
        ".pytest_cache", ".test-logs"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps",
          "--no-build-isolation", "-q", str(src), "-w", str(tmp / "dist")])
    (wheel,) = (tmp / "dist").glob("keras_ginger-*.whl")
    site = tmp / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
          "--target", str(site), str(wheel)])
    return wheel, site


def test_wheel_ships_every_module(installed_wheel):
    wheel, _ = installed_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}
    assert sources <= names, sorted(sources - names)


def test_installed_wheel_trains_outside_the_checkout(installed_wheel,
                                                    tmp_path):
    _, site = installed_wheel
    env = dict(os.environ, PYTHONPATH=str(site), KERAS_BACKEND=BACKEND)
    proc = _run([sys.executable, "-c", TRAIN, os.path.realpath(site)],
                cwd=tmp_path, env=env, timeout=600)
    assert f"trained {BACKEND}" in proc.stdout


def test_every_module_imports_first_in_a_fresh_process():
    """In a fresh process, each module imported first (the package purged
    from sys.modules before each try), then all others forward and in
    reverse: no import cycle, whatever the order."""
    modules = [m for m in MODULES
               if BACKEND_ONLY.get(m, BACKEND) == BACKEND]
    code = (
        "import importlib, sys\n"
        "modules = sys.argv[1:]\n"
        "for first in modules:\n"
        "    for order in (modules, modules[::-1]):\n"
        "        for name in [n for n in sys.modules\n"
        "                     if n.startswith('keras_ginger')]:\n"
        "            del sys.modules[name]\n"
        "        for name in [first] + order:\n"
        "            importlib.import_module(name)\n"
        "print(len(modules))\n")
    proc = _run([sys.executable, "-c", code] + modules, cwd=ROOT,
                env=dict(os.environ, KERAS_BACKEND=BACKEND), timeout=300)
    assert proc.stdout.strip() == str(len(modules))


def test_no_import_cycle_helpers_left():
    """No module-level __getattr__, no function-level import of the package,
    no swallowed ImportError around the public API."""
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            assert not (isinstance(node, ast.FunctionDef)
                        and node.name == "__getattr__"), path
            if isinstance(node, ast.Try):
                caught = [ast.unparse(h.type) for h in node.handlers if h.type]
                assert "ImportError" not in caught, path
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (
                            inner.module or "").startswith("keras_ginger"):
                        # Only the TensorFlow-only module, imported where
                        # a tf.distribute strategy is in use.
                        assert inner.names[0].name == "tf_distribute", (
                            path, node.name)


def test_internal_keras_is_used_only_through_the_compat_module():
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_keras_compat.py":
            continue
        text = path.read_text()
        assert "keras.src" not in text, path
        assert "tf.__internal__" not in text, path
