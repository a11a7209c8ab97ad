"""Ginger under multi-process JAX (2 processes on localhost, one CPU device
each, gloo collectives, `keras.distribution.DataParallel` over the global
devices, each process feeding its half of every global batch): equal to one
process on the global batch, processes bit-identical; the .keras file that
process 0 writes loads in a plain process and resumes as the one-process
run's own file does."""

import os

import keras
import numpy as np
import pytest

from tests import multiprocess

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax",
                                reason="jax.distributed is JAX's")

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process run (each process's state, process 0's .keras file)
    and the one-process run on the global batch (its state and file)."""
    from tests import jax_multiprocess_script as script

    d = tmp_path_factory.mktemp("jax_multiprocess")
    port, = multiprocess.free_ports()
    outs = [str(d / f"process_{r}.npz") for r in range(2)]
    ckpt = str(d / "distributed.keras")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               OMP_NUM_THREADS="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                         "--xla_cpu_multi_thread_eigen=false")
    procs = multiprocess.launch("tests.jax_multiprocess_script",
                                [(r, 2, port, outs[r], ckpt) for r in range(2)],
                                env)
    # The reference, while the two processes start and compile.
    single_ckpt = str(d / "single.keras")
    single = script.run(0, 1, single_ckpt)
    multiprocess.wait(procs)
    return {"processes": [dict(np.load(out)) for out in outs],
            "single": single, "ckpt": ckpt, "single_ckpt": single_ckpt}


def test_two_processes_equal_one_process_on_the_global_batch(runs):
    p0, p1 = runs["processes"]
    assert sorted(p0) == sorted(p1)
    for name in p0:  # one SPMD program: the processes are bit-identical
        np.testing.assert_array_equal(p0[name], p1[name], err_msg=name)
    # g and d of the global batch, summed in another order: a few ulps
    # (the bases U up to the signs of their columns).
    multiprocess.assert_close(p0, runs["single"])
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
    multiprocess.assert_close(resumed, single_resumed)
    assert int(resumed["iterations"]) == 9
