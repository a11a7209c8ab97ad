"""Multi-device training equals one device on the same global batch.

Keras offers keras.distribution (DataParallel, ModelParallel) on JAX and
tf.distribute on TensorFlow; each runs in a subprocess with simulated
devices (tests/distributed_script.py), since device counts are fixed when the
backend starts. Nothing here applies to the torch backend.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests import multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = keras.backend.backend()


def run_script(mode, tmp_path):
    out = os.path.join(tmp_path, f"{mode}.npz")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.distributed_script", mode, out],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out)


def assert_same_training(z):
    n = int(z["n"])
    for i in range(n):
        single, multi = z[f"arr_{i}"], z[f"arr_{i + n}"]
        # float32 reductions in another order: a few ulps of the weights.
        np.testing.assert_allclose(multi, single, rtol=1e-5, atol=1e-5)
    # g and d were both reduced: the curvature is the single-device one.
    M1, M4 = z["M_single"], z["M_multi"]
    assert np.linalg.norm(M4 - M1) <= 1e-5 * np.linalg.norm(M1)
    assert bool(z["sampled_finite"])  # the random sampler runs too


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution is JAX's")
@pytest.mark.parametrize("block", ["", "_kronecker"])
def test_jax_data_parallel_equals_one_device(tmp_path, block):
    assert_same_training(run_script("jax" + block, tmp_path))


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution is JAX's")
def test_jax_model_parallel_shards_basis_like_variable(tmp_path):
    z = run_script("jax_model_parallel", tmp_path)
    assert list(z["spec"]) == ["model", "None"]
    assert list(z["shard_rows"]) == [int(z["n"]) // 4]


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution is JAX's")
@pytest.mark.parametrize("block", ["", "_kronecker"])
def test_jax_sharded_state_equals_replicated(tmp_path, block):
    """`shard_state=True` (ZeRO-1) under DataParallel on 2 and 4 devices:
    U sharded along n and m, v along their first axis over the batch axis;
    weights and every state variable equal one device's (≤ 1e-5); state
    bytes per device ≤ 1/R + 5 % of the replicated state's; `model.save`
    of the sharded run loads in a process without a distribution. With
    Kronecker blocks: L's basis (m = 12 rows) sharded, R's (small)
    replicated, the same equalities."""
    z = run_script("jax_sharded_state" + block, tmp_path)
    ref = "1_0"
    full = int(z[f"bytes_{ref}"])
    n_state = len([k for k in z.files if k.startswith(f"s_{ref}_")])
    for R in (2, 4):
        key = f"{R}_1"
        assert list(z[f"spec_{key}"]) == ["batch", "None"]
        if block:
            assert int(z[f"rows_{key}"]) == 12 // R
            assert int(z[f"bytes_{key}"]) < full
        else:
            assert int(z[f"rows_{key}"]) == 12 * 16 // R
            assert int(z[f"bytes_{key}"]) <= (1 / R + 0.05) * full
        for i in range(len([k for k in z.files if k.startswith("w_1_0_")])):
            np.testing.assert_allclose(z[f"w_{key}_{i}"], z[f"w_{ref}_{i}"],
                                       rtol=1e-5, atol=1e-6)
        for i in range(n_state):
            got, want = z[f"s_{key}_{i}"], z[f"s_{ref}_{i}"]
            if i in set(z["bases"].tolist()):
                got, want = (multiprocess.signed_columns(got),
                             multiprocess.signed_columns(want))
            scale = max(float(np.abs(want).max()), 1e-30)
            assert np.abs(got - want).max() <= 1e-5 * scale, (R, i)
    # The sharded state's checkpoint loads without a distribution, exactly.
    for i in range(n_state):
        np.testing.assert_array_equal(z[f"loaded_{i}"], z[f"s_4_1_{i}"])


@pytest.fixture(scope="module")
def tf_run(tmp_path_factory):
    """One TensorFlow process (2 logical CPUs) for all MirroredStrategy
    checks: TF's start-up and tracing dominate their time."""
    return run_script("tensorflow", tmp_path_factory.mktemp("mirrored"))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute is TF's")
def test_tf_mirrored_strategy_curvature_equals_one_device(tf_run):
    """g and d were both reduced: the curvature is the one-device one (the
    weights: the next test); the random sampler runs under the strategy."""
    M1, M2 = tf_run["M_single"], tf_run["M_multi"]
    assert np.linalg.norm(M2 - M1) <= 1e-5 * np.linalg.norm(M1)
    assert bool(tf_run["sampled_finite"])


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute is TF's")
def test_tf_replicas_sample_from_their_own_streams(tf_run):
    """Each replica samples labels for its own rows: replica r draws from
    base + REPLICA_SEED_STRIDE·r, replica 0 as one device does; with one
    shared stream the replicas' noise would be identical (correlated d)."""
    from keras_ginger.fisher_loss import REPLICA_SEED_STRIDE

    base = int(tf_run["one_device_base"])
    assert list(tf_run["replica_bases"]) == [base, base + REPLICA_SEED_STRIDE]
    draws = tf_run["replica_draws"]
    np.testing.assert_array_equal(draws[0], tf_run["one_device_draw"])
    assert np.abs(draws[0] - draws[1]).min() > 0


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute is TF's")
@pytest.mark.parametrize("loss_scale", ["plain", "lso"])
@pytest.mark.parametrize("fisher", ["fisher", "empirical"])
def test_tf_mirrored_two_replicas_equal_one_device(tf_run, loss_scale,
                                                   fisher):
    """2 logical CPUs = one device on the same global batch, 3 epochs, with
    and without a LossScaleOptimizer (d through the per-replica hand-over),
    with and without `with_fisher` (without it d is the reduced g, not
    g/√R)."""
    key = f"{loss_scale}_{fisher}"
    names = sorted(k for k in tf_run.files if k.startswith(key + "_single"))
    assert names
    for name in names:
        single = tf_run[name]
        multi = tf_run[name.replace("_single_", "_multi_")]
        moved = np.linalg.norm(multi - single)
        assert moved <= 1e-5 * np.linalg.norm(single), (name, moved)
    assert len(names) == 4  # 2 layers × (kernel, bias)


@pytest.fixture(scope="module")
def tf_kronecker_run(tmp_path_factory):
    return run_script("tensorflow_kronecker",
                      tmp_path_factory.mktemp("mirrored_kronecker"))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute is TF's")
@pytest.mark.parametrize("loss_scale", ["plain", "lso"])
def test_tf_mirrored_kronecker_equals_one_device(tf_kronecker_run,
                                                 loss_scale):
    """Kronecker blocks under MirroredStrategy (2 logical CPUs), with
    `with_fisher`, with and without a LossScaleOptimizer: the weights and
    the first kernel's factors L, R equal one device's."""
    z = tf_kronecker_run
    key = f"{loss_scale}_fisher"
    names = sorted(k for k in z.files if k.startswith(key + "_single"))
    assert len(names) == 4
    for name in names:
        single, multi = z[name], z[name.replace("_single_", "_multi_")]
        moved = np.linalg.norm(multi - single)
        assert moved <= 1e-5 * np.linalg.norm(single), (name, moved)
    M1, M2 = z["M_single"], z["M_multi"]
    assert np.linalg.norm(M2 - M1) <= 1e-5 * np.linalg.norm(M1)
