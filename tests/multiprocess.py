"""What the multi-process (and multi-device) tests share: free localhost
ports, launching one Python process per rank, each rank's rows of a global
batch, a deterministic sampler, and comparing states whose bases U are
defined up to the signs of their columns."""

import os
import socket
import subprocess
import sys
import tempfile

import keras
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_ports(n=1):
    """n distinct free TCP ports on 127.0.0.1 (held open together, so that
    they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def launch(module, args_per_rank, env):
    """Start ``python -m module *args`` once per entry of `args_per_rank`
    (in the repository root, with `env`); returns the processes. Their
    output goes to temporary files, not pipes: a rank blocked in a
    collective must not wait on another whose pipe is full."""
    procs = []
    for args in args_per_rank:
        log = tempfile.TemporaryFile("w+")
        p = subprocess.Popen(
            [sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        p.log = log
        procs.append(p)
    return procs


def wait(procs, timeout=300):
    """Wait for every process; fail with its output's tail if one failed
    (the others are killed)."""
    try:
        for p in procs:
            p.wait(timeout=timeout)
            p.log.seek(0)
            assert p.returncode == 0, p.log.read()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.log.close()


def local_rows(a, index, parts, global_batch):
    """Rows of ``a`` that process (or input pipeline) ``index`` of ``parts``
    feeds: its 1/parts of every global batch, in order."""
    shard = global_batch // parts
    a = a.reshape(-1, global_batch, *a.shape[1:])
    return a[:, index * shard:(index + 1) * shard].reshape(-1, *a.shape[2:])


def shifted_mean(y_pred, seed):
    """A deterministic 'sampler' (ŷ = f + 0.5): d is the same however the
    batch is split, so runs on one and on several devices compare
    exactly."""
    return y_pred + 0.5


def signed_columns(U):
    """U (n, k) with each column's largest entry positive: an eigenvector's
    sign is arbitrary, and float32 sums in another order may flip it."""
    idx = np.abs(U).argmax(axis=0)
    return U * np.sign(U[idx, np.arange(U.shape[1])])


def state(model):
    """{name: array}: the weights (``w0``, ...), the optimizer variables
    (``opt00``, ...; a basis U ``opt03:curvature_basis``) by position (a
    loaded model's variables have other paths), and ``iterations``."""
    out = {f"w{i}": v for i, v in enumerate(model.trainable_variables)}
    for i, v in enumerate(model.optimizer.variables):
        basis = v.path.endswith("curvature_basis")
        out[f"opt{i:02d}" + (":curvature_basis" if basis else "")] = v
    out["iterations"] = model.optimizer.iterations
    return {k: np.array(keras.ops.convert_to_numpy(v))
            for k, v in out.items()}


def signed(name, a):
    """`signed_columns` for a basis named by `state`, else `a`."""
    return signed_columns(a) if name.endswith("curvature_basis") else a


def assert_close(got, want, rtol=1e-5):
    """Every array of a `state` ``want`` within ``rtol`` (relative, in norm)
    in ``got``, bases up to column signs; integer (or all-zero) ones
    equal."""
    assert sorted(got) == sorted(want)
    assert any(k.endswith("curvature_basis") for k in want)
    for name in sorted(want):
        a, b = signed(name, got[name]), signed(name, want[name])
        if not np.issubdtype(b.dtype, np.floating) or not np.any(b):
            np.testing.assert_array_equal(a, b, err_msg=name)
            continue
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert rel <= rtol, (name, rel)
