"""Ginger under `tf.distribute.MultiWorkerMirroredStrategy` (2 workers on
localhost via TF_CONFIG, one CPU replica each, each worker feeding its half
of every global batch): equal to one process (no strategy) on the global
batch, workers bit-identical; through a custom loop
(``strategy.run(model.train_step)``) and through `fit`, which in Keras 3
needs two Keras bugs worked around (see tests/tf_multiworker_script.py)."""

import os

import keras
import numpy as np
import pytest

from tests import multiprocess

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="tf.distribute is TF's")

WORKERS = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each worker's states (``loop_*`` and ``fit_*``) and the one-process
    run's state."""
    from tests import tf_multiworker_script as script

    d = tmp_path_factory.mktemp("tf_multiworker")
    ports = ",".join(str(p) for p in multiprocess.free_ports(WORKERS))
    outs = [str(d / f"worker_{r}.npz") for r in range(WORKERS)]
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(KERAS_BACKEND="tensorflow", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    procs = multiprocess.launch("tests.tf_multiworker_script",
                                [(r, ports, outs[r]) for r in range(WORKERS)],
                                env)
    single = script.global_batches()  # while the workers start
    multiprocess.wait(procs)
    return [dict(np.load(out)) for out in outs], single


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
    multiprocess.assert_close(got, single)
