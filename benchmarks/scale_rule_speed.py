"""What the scale rule costs: Ginger's default step (Adam's metric, grafted,
relative damping) and the Euclidean grafted step against the paper's step
and Adam, timed interleaved; optionally against a baseline revision's code.

    KERAS_BACKEND=jax python benchmarks/scale_rule_speed.py [--n 4e6]
        [--tau 8] [--repeats 15] [--baseline REV --rounds 4]

On a shared machine whose speed moves from minute to minute, timing one
optimizer after another makes their ratio noisy; here each repeat times
Adam, the paper's Ginger and the two grafted Gingers back to back (compiled as
`benchmarks/optimizer_speed.py` compiles them) and the report gives the
median of the per-repeat ratios to Adam.

With ``--baseline REV`` (e.g. the commit before the scale rule, b88eb71),
REV's `keras_ginger` is extracted with `git archive` and timed in its own
process (Adam and its `Ginger(tau=τ)` step, the paper's), alternating with a
process timing this checkout, for ``--rounds`` rounds: each process gives
ratios to the Adam it timed itself, so the two ratios compare across
processes on the same day (#11's bound: the default's ratio to Adam at most
1.10 × the baseline's). Writes results/scale_rule_speed_<backend>.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _variants(keras_ginger, tau):
    """name -> Ginger constructor keyword arguments (None: Keras Adam)."""
    import inspect

    if "graft" not in inspect.signature(keras_ginger.Ginger).parameters:
        return {"adam": None, "paper": {"tau": tau}}  # before the scale rule
    return {
        "adam": None,
        "paper": dict(tau=tau, graft=None, relative_damping=False,
                      metric=None),
        "graft": dict(tau=tau, graft="adam", metric=None),
        "default": dict(tau=tau),
    }


def worker(args):
    """Time this process's keras_ginger; print {name: [seconds]} as JSON."""
    if args.code:
        sys.path.insert(0, args.code)
    import keras
    import numpy as np

    import keras_ginger

    sys.path.insert(0, HERE)
    from optimizer_speed import _sync, compiled_update

    n = int(args.n)
    rng = np.random.default_rng(0)
    g = [keras.ops.convert_to_tensor(
        rng.standard_normal(n).astype("float32"))]
    d = [keras.ops.convert_to_tensor(
        rng.standard_normal(n).astype("float32"))]
    updates = {}
    for name, kw in _variants(keras_ginger, args.tau).items():
        opt = (keras.optimizers.Adam(1e-3) if kw is None
               else keras_ginger.Ginger(**kw))
        updates[name] = compiled_update(
            opt, [keras.Variable(np.zeros(n, "float32"))], kw is not None)
    for fn in updates.values():  # compile and settle
        for _ in range(3):
            _sync(fn(g, d))
    times = {k: [] for k in updates}
    for _ in range(args.repeats):
        for name, fn in updates.items():
            t0 = time.perf_counter()
            _sync(fn(g, d))
            times[name].append(time.perf_counter() - t0)
    print("TIMES " + json.dumps({
        "code": args.code or REPO, "keras_ginger": keras_ginger.__file__,
        "backend": keras.backend.backend(), "keras": keras.__version__,
        "times": times}))


def _ratios(times):
    adam = times["adam"]
    return {f"{k}_over_adam": statistics.median(
        x / y for x, y in zip(v, adam)) for k, v in times.items()
        if k != "adam"}


def _run_worker(args, code=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker",
           "--n", str(args.n), "--tau", str(args.tau),
           "--repeats", str(args.repeats)]
    if code:
        cmd += ["--code", code]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    line = [s for s in out.stdout.splitlines() if s.startswith("TIMES ")][-1]
    return json.loads(line[len("TIMES "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=float, default=4e6)
    parser.add_argument("--tau", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--baseline", default=None, metavar="REV")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--worker", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("--code", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        if args.baseline:
            base = os.path.join(tmp, "baseline")
            os.makedirs(base)
            archive = subprocess.run(
                ["git", "-C", REPO, "archive", args.baseline, "keras_ginger"],
                check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", base], input=archive,
                           check=True)
        for r in range(args.rounds if base else 1):
            row = {"current": _run_worker(args)}
            if base:
                row["baseline"] = _run_worker(args, base)
            rounds.append(row)
            print(f"round {r}: current " + json.dumps(
                _ratios(row["current"]["times"]))
                + ("" if not base else "; baseline " + json.dumps(
                    _ratios(row["baseline"]["times"]))), flush=True)

    def pooled(which):
        times = {}
        for row in rounds:
            for k, v in row[which]["times"].items():
                times.setdefault(k, []).extend(v)
        return times

    cur = pooled("current")
    ratios = _ratios(cur)
    ratios["default_over_paper"] = statistics.median(
        x / y for x, y in zip(cur["default"], cur["paper"]))
    ratios["graft_over_paper"] = statistics.median(
        x / y for x, y in zip(cur["graft"], cur["paper"]))
    n = int(args.n)
    ns = {k: 1e9 * statistics.median(v) / n for k, v in cur.items()}
    result = {"ns_per_param": ns, "ratios": ratios}
    if base:
        b = _ratios(pooled("baseline"))["paper_over_adam"]
        result["baseline"] = {
            "rev": args.baseline,
            "paper_over_adam": b,
            "ns_per_param": {k: 1e9 * statistics.median(v) / n
                             for k, v in pooled("baseline").items()}}
        base_ns = result["baseline"]["ns_per_param"]
        result["bound"] = {
            f"{k}_over_adam / baseline": ratios[f"{k}_over_adam"] / b
            for k in ("default", "graft", "paper")}
        # Adam's own time differs between processes (it is small, and its
        # buffers sit differently among the others), so the ratio of ratios
        # also moves with Adam; the processes alternate, so the medians of
        # absolute times are compared too.
        result["bound"].update({
            f"{k}_ns / baseline paper_ns": ns[k] / base_ns["paper"]
            for k in ("default", "graft", "paper")})
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"),
            "backend": rounds[0]["current"]["backend"],
            "machine": f"{platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} cores",
            "keras": rounds[0]["current"]["keras"], "n": n, "tau": args.tau,
            "repeats": args.repeats, "rounds": len(rounds),
            "argv": sys.argv[1:]}
    print(json.dumps({"meta": meta, **result}, indent=1))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results",
                        f"scale_rule_speed_{meta['backend']}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, **result, "rounds": rounds}, f, indent=1)
    print("wrote", os.path.relpath(path))


if __name__ == "__main__":
    main()
