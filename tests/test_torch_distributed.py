"""Ginger under torch.distributed (2 gloo ranks on localhost, DDP, the
custom loop of Keras's torch guide): equal to one process on the global
batch, replicas bit-identical; without combining d they drift apart."""

import os

import keras
import numpy as np
import pytest

from tests import multiprocess

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch",
                                reason="torch.distributed is torch's")


def _two_ranks(mode, tmp_path):
    port, = multiprocess.free_ports()
    outs = [str(tmp_path / f"{mode}_{r}.npz") for r in range(2)]
    env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
    multiprocess.wait(multiprocess.launch(
        "tests.torch_ddp_script",
        [(r, 2, port, mode, outs[r]) for r in range(2)], env))
    runs = []
    for out in outs:
        z = np.load(out)
        arrays = [z[f"arr_{i}"] for i in range(len(z.files) - 1)]
        runs.append((arrays[:int(z["n"])], arrays[int(z["n"]):]))
    return runs


def _signed_if_basis(a):
    return multiprocess.signed_columns(a) if a.ndim == 2 else a


@pytest.fixture(scope="module")
def one_process():
    from tests import torch_ddp_script

    return torch_ddp_script.run(0, 1, "shifted")


def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path,
                                                         one_process):
    r0, r1 = _two_ranks("shifted", tmp_path)
    for a, b in zip(r0[0] + r0[1], r1[0] + r1[1]):
        np.testing.assert_array_equal(a, b)  # replicas bit-identical
    # g and d combined as one process would: float32 sums in another order,
    # to a few ulps (the bases U up to the signs of their columns).
    for got, want in zip(r0[0], one_process[0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(r0[1], one_process[1]):
        np.testing.assert_allclose(_signed_if_basis(got),
                                   _signed_if_basis(want), rtol=1e-5,
                                   atol=1e-6)


def test_sampled_fisher_replicas_stay_identical_and_unreduced_drift(tmp_path):
    r0, r1 = _two_ranks("sampled", tmp_path)
    for a, b in zip(r0[0] + r0[1], r1[0] + r1[1]):
        np.testing.assert_array_equal(a, b)
    u0, u1 = _two_ranks("unreduced", tmp_path)
    # The control: each rank's own d grows its own curvature, and the
    # weights follow.
    assert max(np.abs(a - b).max() for a, b in zip(u0[0], u1[0])) > 1e-4
