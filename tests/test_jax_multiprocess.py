"""Ginger under multi-process JAX (2 processes on localhost, one CPU device
each, gloo collectives, `keras.distribution.DataParallel` over the global
devices, each process feeding its half of every global batch): equal to one
process on the global batch, processes bit-identical; the .keras file that
process 0 writes loads in a plain process and resumes as the one-process
run's own file does."""

import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax",
                                reason="jax.distributed is JAX's")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process run (each process's state, process 0's .keras file)
    and the one-process run on the global batch (its state and file)."""
    from tests import jax_multiprocess_script as script

    d = tmp_path_factory.mktemp("jax_multiprocess")
    port = _free_port()
    outs = [str(d / f"process_{r}.npz") for r in range(2)]
    ckpt = str(d / "distributed.keras")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               OMP_NUM_THREADS="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                         "--xla_cpu_multi_thread_eigen=false")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.jax_multiprocess_script", str(r), "2",
         str(port), outs[r], ckpt], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)]
    try:
        # The reference, while the two processes start and compile.
        single_ckpt = str(d / "single.keras")
        single = script.run(0, 1, single_ckpt)
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return {"processes": [dict(np.load(out)) for out in outs],
            "single": single, "ckpt": ckpt, "single_ckpt": single_ckpt}


def _signed(name, a):
    """A basis U (n, k) with each column's largest entry positive: an
    eigenvector's sign is arbitrary, and float32 sums in another order may
    flip it."""
    if not name.endswith("curvature_basis"):
        return a
    idx = np.abs(a).argmax(axis=0)
    return a * np.sign(a[idx, np.arange(a.shape[1])])


def _assert_close(got, want, rtol=1e-5):
    """Every array of ``want`` within ``rtol`` (relative, in norm) in
    ``got``; integer ones (the step count) equal."""
    assert sorted(got) == sorted(want)
    assert any(k.endswith("curvature_basis") for k in want)
    for name in sorted(want):
        a, b = _signed(name, got[name]), _signed(name, want[name])
        if not np.issubdtype(b.dtype, np.floating) or not np.any(b):
            np.testing.assert_array_equal(a, b, err_msg=name)
            continue
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert rel <= rtol, (name, rel)


def test_two_processes_equal_one_process_on_the_global_batch(runs):
    p0, p1 = runs["processes"]
    assert sorted(p0) == sorted(p1)
    for name in p0:  # one SPMD program: the processes are bit-identical
        np.testing.assert_array_equal(p0[name], p1[name], err_msg=name)
    # g and d of the global batch, summed in another order: a few ulps
    # (the bases U up to the signs of their columns).
    _assert_close(p0, runs["single"])
    assert int(p0["iterations"]) == 8


def test_process_0_checkpoint_loads_and_resumes_in_a_plain_process(runs):
    from tests import jax_multiprocess_script as script

    loaded, resumed = script.resume(runs["ckpt"])
    # The file holds the distributed run's weights and optimizer state.
    want = runs["processes"][0]
    assert sorted(loaded) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(loaded[name], want[name],
                                      err_msg=name)
    # One more step: as the one-process run resumed from its own file.
    _, single_resumed = script.resume(runs["single_ckpt"])
    _assert_close(resumed, single_resumed)
    assert int(resumed["iterations"]) == 9
