"""Train-step time: Ginger + sampled Fisher against Adam, same model/backend.

    KERAS_BACKEND=jax python benchmarks/train_step.py [--repeats 30]
        [--models digits_cnn mlp_400k char_lm embeddings] [--out PATH.json]
        [--batch-size N] [--jit-compile auto|true|false]

Models (random inputs of the right shape, vocabulary and sequence length;
the data do not change the time of a step):

* digits_cnn, mlp_400k: a 151k-parameter CNN on 8x8x1 inputs and a 400k MLP
  on 256 features, 10 classes, batch 128;
* char_lm: the convergence suite's character transformer LM
  (`convergence_tasks.CharLM`: 2 pre-LN blocks, d_model 64, context 64,
  vocabulary 135), batch 32, as that task trains;
* embeddings: the suite's two-tower next-word model
  (`convergence_tasks.Embeddings`: two Embedding(2000, 32) tables + MLP),
  batch 128, as that task trains.

Each is compiled with sparse cross-entropy on logits and Keras's default
`jit_compile="auto"` (JAX: jax.jit; TensorFlow: tf.function, XLA only with
an accelerator; torch: eager); the output says which mode ran. Optimizers
(columns; each gets a freshly built model with the same initial weights):

* adam:               keras.optimizers.Adam, Keras's own train step;
* ginger_empirical:   Ginger() with d = g (Keras's train step, no Fisher
                      pass): the optimizer's own cost over Adam;
* ginger_fisher:      Ginger() + with_fisher: one forward, two backward
                      passes (g and the sampled-label d), curvature every
                      step;
* ginger_fisher_k10:  the same with curvature_interval=10;
* ginger_vector, ginger_kronecker(_k10): Ginger + with_fisher with
                      curvature="vector" (the paper's block on every
                      variable) and "auto" (Kronecker blocks on the
                      matrix-shaped ones), the latter also with
                      curvature_interval=10;
* ginger_kronecker_ki10, ginger_kronecker_k2_ki5: the Kronecker block
                      with its full factors decomposed every 10 refreshes
                      (`kronecker_interval=10`, d every step), and with d
                      every 2 steps, decomposed every 5 refreshes (every
                      10 steps); their means over a multiple of 10 steps
                      (--repeats 20) are the amortised cost;
* ginger_kronecker_k5_ki2: d every 5 steps, the full factors decomposed
                      every second refresh (every 10 steps);
* embeddings only, Ginger() + with_fisher with the tables kept out of the
  curvature (they take Adam's step): ginger_fisher_maxsize with
  max_curvature_size=63999 (one less than a table's 2000x32 entries) and
  ginger_fisher_noemb with exclude_from_curvature=["embedding"] (matches
  the paths context_embedding/embeddings and
  target_tower/target_embedding/embeddings). The JSON gives, per Ginger
  column, the parameters that do get curvature (`_curvature_params`).

Two times per column, each with its ratio to Adam's:

* first step: the first `train_on_batch` of the fresh model, i.e. tracing,
  compilation and building the optimizer state plus one step. So that no
  column pays one-time costs of the process (e.g. torch's first
  convolution), a tiny model is first trained once with Adam and with
  Ginger + Fisher, and each model once with Adam, untimed (every timed
  column still traces and compiles its own train function);
* steady state: after 3 more warm-up steps, the median of --repeats timed
  `train_on_batch` calls. With curvature_interval=10 the median is a step
  without the Fisher pass (9 in 10 are); the JSON also has the mean
  (`_mean_ms`), the amortised cost.

"d costs at most one extra backward pass" reads as: ginger_fisher -
ginger_empirical ≲ (forward+backward) - forward, both measured here on JAX
(`fwd` is a jitted forward pass, `fwd_bwd` a jitted value-and-gradient).
Writes JSON and Markdown (default benchmarks/results/train_step_<backend>;
--out PATH.json writes PATH.json and PATH.md) with the date, machine, Keras
and backend versions, execution mode, batch sizes and the devices: a line
"no GPU measured" when the backend sees no accelerator.
"""

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import Callable
from typing import NamedTuple

import keras
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import bench_env  # noqa: E402
import convergence_tasks  # noqa: E402
import keras_ginger  # noqa: E402

BACKEND = keras.backend.backend()
RESULTS = os.path.join(HERE, "results")
# CharLM's vocabulary: <unk> + the 134 characters seen >= 20 times in the
# ACLSum training text (`describe()["vocab"]` in results/convergence_char_lm).
CHAR_VOCAB = 135
EMBEDDING_TABLE = (convergence_tasks.Embeddings.vocab_size
                   * convergence_tasks.Embeddings.dim)


# ------------------------------------------------------------------ models
def cnn():
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ])


def mlp():
    return keras.Sequential([
        keras.Input((256,)),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(10),
    ])


def _task_builder(task_cls, **attrs):
    """The task's own model builder, without loading its data: the builders
    need only the vocabulary size, set here."""

    class NoData(task_cls):
        def data(self):
            return None

    def build():
        task = NoData()
        for key, value in attrs.items():
            setattr(task, key, value)
        return task.build(seed=0)

    return build


def dense_inputs(shape, classes):
    def inputs(rng, n):
        x = rng.standard_normal((n, *shape)).astype("float32")
        return x, rng.integers(0, classes, n).astype("int32")
    return inputs


def token_inputs(length, vocab, labels_per_token):
    def inputs(rng, n):
        x = rng.integers(0, vocab, (n, length)).astype("int32")
        y_shape = (n, length) if labels_per_token else (n,)
        return x, rng.integers(1, vocab, y_shape).astype("int32")
    return inputs


class Spec(NamedTuple):
    build: Callable  # () -> keras.Model (uncompiled)
    batch_size: int
    inputs: Callable  # (rng, batch size) -> (x, y)
    extra_configs: tuple = ()  # keys of EXTRA_CONFIGS also run


CharLM, Embeddings = convergence_tasks.CharLM, convergence_tasks.Embeddings
MODELS = {
    "digits_cnn": Spec(cnn, 128, dense_inputs((8, 8, 1), 10)),
    "mlp_400k": Spec(mlp, 128, dense_inputs((256,), 10)),
    "char_lm": Spec(_task_builder(CharLM, vocab=[None] * CHAR_VOCAB),
                    CharLM.batch_size,
                    token_inputs(CharLM.context, CHAR_VOCAB, True)),
    "embeddings": Spec(_task_builder(Embeddings), Embeddings.batch_size,
                       token_inputs(Embeddings.context,
                                    Embeddings.vocab_size, False),
                       ("ginger_fisher_maxsize", "ginger_fisher_noemb")),
}


# -------------------------------------------------------------- optimizers
class Config(NamedTuple):
    label: str  # Markdown column
    optimizer: Callable  # () -> a fresh optimizer
    fisher: bool  # keras_ginger.with_fisher on the model


Ginger = keras_ginger.Ginger
CONFIGS = {
    "adam": Config("Adam", keras.optimizers.Adam, False),
    "ginger_empirical": Config("Ginger d=g", Ginger, False),
    "ginger_fisher": Config("Ginger+Fisher", Ginger, True),
    "ginger_fisher_k10": Config(
        "Ginger+Fisher k=10", lambda: Ginger(curvature_interval=10), True),
    "ginger_vector": Config(
        "Ginger+Fisher vector", lambda: Ginger(curvature="vector"), True),
    "ginger_kronecker": Config(
        "Ginger+Fisher Kronecker", lambda: Ginger(curvature="auto"), True),
    "ginger_kronecker_k10": Config(
        "Ginger+Fisher Kronecker k=10",
        lambda: Ginger(curvature="auto", curvature_interval=10), True),
    "ginger_kronecker_ki10": Config(
        "Ginger+Fisher Kronecker, eigh every 10",
        lambda: Ginger(curvature="auto", kronecker_interval=10), True),
    "ginger_kronecker_k2_ki5": Config(
        "Ginger+Fisher Kronecker, d every 2, eigh every 10",
        lambda: Ginger(curvature="auto", curvature_interval=2,
                       kronecker_interval=5), True),
    "ginger_kronecker_k5_ki2": Config(
        "Ginger+Fisher Kronecker, d every 5, eigh every 10",
        lambda: Ginger(curvature="auto", curvature_interval=5,
                       kronecker_interval=2), True),
}
EXTRA_CONFIGS = {
    "ginger_fisher_maxsize": Config(
        "Ginger+Fisher, tables: max_curvature_size",
        lambda: Ginger(max_curvature_size=EMBEDDING_TABLE - 1), True),
    "ginger_fisher_noemb": Config(
        "Ginger+Fisher, tables: exclude_from_curvature",
        lambda: Ginger(exclude_from_curvature=["embedding"]), True),
}


def configs_for(spec):
    return dict(CONFIGS, **{k: EXTRA_CONFIGS[k] for k in spec.extra_configs})


# ----------------------------------------------------------------- timing
def make(build, config, jit_compile):
    keras.utils.set_random_seed(0)
    model = build()
    if config.fisher:
        keras_ginger.with_fisher(model)
    optimizer = config.optimizer()
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model, optimizer


def time_call(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_steps(model, x, y, repeats):
    """(first call, median, mean) of `train_on_batch`, in ms."""
    step = lambda: model.train_on_batch(x, y)  # noqa: E731
    first = time_call(step)
    for _ in range(3):
        step()
    times = [time_call(step) for _ in range(repeats)]
    return 1e3 * first, 1e3 * statistics.median(times), 1e3 * np.mean(times)


def warm_up_process(jit_compile):
    """One step of a tiny model with Adam and Ginger + Fisher, so that the
    first-step times exclude the process's one-time start-up costs."""
    rng = np.random.default_rng(1)
    x, y = dense_inputs((4,), 3)(rng, 8)
    tiny = lambda: keras.Sequential(  # noqa: E731
        [keras.Input((4,)), keras.layers.Dense(3)])
    for key in ("adam", "ginger_fisher"):
        make(tiny, CONFIGS[key], jit_compile)[0].train_on_batch(x, y)


def time_forward_backward(model, x, y, repeats):
    """Jitted forward, and forward + gradient, of the same model (JAX only)."""
    if BACKEND != "jax":
        return None, None
    import jax

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]

    def loss(tv, x, y):
        logits, _ = model.stateless_call(tv, ntv, x)
        return loss_fn(y, logits)

    out = []
    for fn in (jax.jit(loss), jax.jit(jax.value_and_grad(loss))):
        run = lambda: jax.block_until_ready(fn(tv, x, y))  # noqa: E731
        run()
        out.append(1e3 * statistics.median(
            [time_call(run) for _ in range(repeats)]))
    return out


# ------------------------------------------------------------ environment
def execution_mode(model):
    """How Keras ran the train step on this backend."""
    jit = bool(model.jit_compile)
    if model.run_eagerly:
        return "eager (run_eagerly)"
    return {
        "jax": "jax.jit (XLA)" if jit else "eager (no jax.jit)",
        "tensorflow": ("tf.function + XLA" if jit
                       else "tf.function graph, no XLA"),
        "torch": "torch.compile" if jit else "eager",
    }[BACKEND]


def backend_version():
    module = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}
    return __import__(module[BACKEND]).__version__


# ------------------------------------------------------------- benchmark
def trainable_params(model, keep=lambda v: True):
    return int(sum(np.prod(v.shape) for v in model.trainable_variables
                   if keep(v)))


def curvature_params(model, optimizer):
    """Parameters that Ginger preconditions by their own curvature."""
    return trainable_params(model, optimizer.uses_curvature)


def bench_model(name, args, rng):
    spec = MODELS[name]
    batch = args.batch_size or spec.batch_size
    x, y = spec.inputs(rng, batch)
    row = {"backend": BACKEND, "model": name, "batch_size": batch}
    print(f"{name}: batch {batch}", flush=True)
    make(spec.build, CONFIGS["adam"], args.jit_compile)[0].train_on_batch(
        x, y)  # untimed: first use of these layers and shapes
    for key, config in configs_for(spec).items():
        if args.configs and key != "adam" and key not in args.configs:
            continue
        model, optimizer = make(spec.build, config, args.jit_compile)
        first, median, mean = time_steps(model, x, y, args.repeats)
        row.update(params=trainable_params(model),
                   mode=execution_mode(model))
        row.update({key + "_first_ms": first, key + "_ms": median,
                    key + "_mean_ms": mean})
        if key != "adam":
            row[key + "_curvature_params"] = curvature_params(model,
                                                              optimizer)
            row[key + "_over_adam"] = median / row["adam_ms"]
            row[key + "_first_over_adam"] = first / row["adam_first_ms"]
        print(f"  {key:22s} first {first:9.1f} ms "
              f"({first / row['adam_first_ms']:5.2f}x)   "
              f"median {median:8.2f} ms ({median / row['adam_ms']:5.2f}x)",
              flush=True)
    fwd, fwd_bwd = time_forward_backward(model, x, y, args.repeats)
    if fwd is not None:
        row["forward_ms"], row["forward_backward_ms"] = fwd, fwd_bwd
    return row


# ---------------------------------------------------------------- output
def metadata(args, rows):
    devices = bench_env.accelerators()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": bench_env.machine(),
        "keras": keras.__version__,
        "backend": f"{BACKEND} {backend_version()}",
        "mode": sorted({r["mode"] for r in rows}),
        "accelerators": devices,
        "devices": bench_env.devices_note(),
        "repeats": args.repeats,
        "statistic": f"first call; median of {args.repeats}",
        "batch_sizes": {r["model"]: r["batch_size"] for r in rows},
    }


def ratio_cell(row, key, first):
    suffix = "_first" if first else ""
    if key + "_ms" not in row:
        return "–"
    ms = row[key + suffix + "_ms"]
    if key == "adam":
        return f"{ms:.2f}"
    return f"{ms:.2f} ({row[key + suffix + '_over_adam']:.2f}×)"


def markdown_table(rows, keys, first):
    labels = {**CONFIGS, **EXTRA_CONFIGS}
    head = ["model", "batch", "params"] + [labels[k].label for k in keys]
    if not first:
        head += ["forward", "fwd+bwd"]
    lines = ["| " + " | ".join(head) + " |",
             "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [r["model"], str(r["batch_size"]), f"{r['params']:,}"]
        cells += [ratio_cell(r, k, first) for k in keys]
        if not first:
            cells += ([f"{r['forward_ms']:.2f}",
                       f"{r['forward_backward_ms']:.2f}"]
                      if "forward_ms" in r else ["–", "–"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(meta, rows):
    keys = list(CONFIGS) + [k for k in EXTRA_CONFIGS
                            if any(k + "_ms" in r for r in rows)]
    notes = [f"- {r['model']} {k}: curvature on "
             f"{r[k + '_curvature_params']:,} of {r['params']:,} parameters"
             for r in rows for k in EXTRA_CONFIGS if k + "_ms" in r]
    return "\n".join([
        f"Train step, backend {meta['backend']} "
        f"({', '.join(meta['mode'])}), Keras {meta['keras']}, "
        f"{meta['machine']}, {meta['date']}",
        "",
        f"{meta['devices']}.",
        "",
        f"Steady state, ms (median of {meta['repeats']} "
        "steps after 3 warm-up steps; × Adam):",
        "",
        markdown_table(rows, keys, first=False),
        "",
        "First step, ms (first `train_on_batch`: tracing, compilation, "
        "optimizer state and one step; × Adam's first step):",
        "",
        markdown_table(rows, keys, first=True),
        "",
        *notes,
    ]) + "\n"


def write(out, meta, rows):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    text = markdown(meta, rows)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(text)
    print(text)
    print("wrote", out)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="one batch size for every model (default: "
                        "each model's own)")
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        choices=list(MODELS))
    parser.add_argument("--configs", nargs="+", default=None,
                        choices=list(CONFIGS) + list(EXTRA_CONFIGS),
                        help="columns to time (default: all; adam is "
                        "always timed, every ratio is to it)")
    parser.add_argument("--jit-compile", default="auto",
                        choices=["auto", "true", "false"],
                        help="model.compile's jit_compile (default: Keras's "
                        "auto)")
    parser.add_argument("--out", default=os.path.join(
        RESULTS, f"train_step_{BACKEND}.json"),
        help="JSON path; the Markdown goes next to it (.md)")
    args = parser.parse_args()
    args.jit_compile = {"auto": "auto", "true": True,
                        "false": False}[args.jit_compile]
    return args


def main():
    args = parse_args()
    warnings.simplefilter("ignore")
    print(f"backend={BACKEND} keras={keras.__version__} "
          f"accelerators={bench_env.accelerators() or 'none'}", flush=True)
    warm_up_process(args.jit_compile)
    rng = np.random.default_rng(0)
    rows = [bench_model(name, args, rng) for name in args.models]
    write(args.out, metadata(args, rows), rows)


if __name__ == "__main__":
    main()
