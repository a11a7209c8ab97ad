"""Ginger under `tf.distribute.MultiWorkerMirroredStrategy` (2 workers on
localhost via TF_CONFIG, one CPU replica each, each worker feeding its half
of every global batch): equal to one process (no strategy) on the global
batch, workers bit-identical; through a custom loop
(``strategy.run(model.train_step)``) and through `fit`, which in Keras 3
needs two Keras bugs worked around (see tests/tf_multiworker_script.py)."""

import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="tf.distribute is TF's")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = 2


def _free_ports(n):
    """n distinct free ports (all bound at once while they are picked)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each worker's states (``loop_*`` and ``fit_*``) and the one-process
    run's state."""
    from tests import tf_multiworker_script as script

    d = tmp_path_factory.mktemp("tf_multiworker")
    ports = ",".join(str(p) for p in _free_ports(WORKERS))
    outs = [str(d / f"worker_{r}.npz") for r in range(WORKERS)]
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(KERAS_BACKEND="tensorflow", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.tf_multiworker_script", str(r), ports,
         outs[r]], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(WORKERS)]
    try:
        single = script.global_batches()  # while the workers start
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return [dict(np.load(out)) for out in outs], single


def _signed(name, a):
    """A basis U (n, k) with each column's largest entry positive: an
    eigenvector's sign is arbitrary, and float32 sums in another order may
    flip it."""
    if not name.endswith("curvature_basis"):
        return a
    idx = np.abs(a).argmax(axis=0)
    return a * np.sign(a[idx, np.arange(a.shape[1])])


def test_workers_are_bit_identical(runs):
    (w0, w1), _ = runs
    assert sorted(w0) == sorted(w1)
    for name in w0:
        np.testing.assert_array_equal(w0[name], w1[name], err_msg=name)


@pytest.mark.parametrize("how", ["loop", "fit"])
def test_two_workers_equal_one_process_on_the_global_batch(runs, how):
    """g summed, d summed and divided by √2 across the workers
    (keras_ginger.tf_distribute): the one-process weights and optimizer
    state, to float32 sums in another order (U up to column signs)."""
    (w0, _), single = runs
    got = {k[len(how) + 1:]: v for k, v in w0.items()
           if k.startswith(how + "_")}
    assert sorted(got) == sorted(single)
    assert int(got["iterations"]) == int(single["iterations"]) == 6
    assert any(k.endswith("curvature_basis") for k in single)
    for name in sorted(single):
        a, b = _signed(name, got[name]), _signed(name, single[name])
        if not np.issubdtype(b.dtype, np.floating) or not np.any(b):
            np.testing.assert_array_equal(a, b, err_msg=name)
            continue
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert rel <= 1e-5, (name, rel)
