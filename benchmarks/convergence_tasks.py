"""Tasks of the convergence suite: a model, its data, its loss, a step budget.

All data ships inside pip packages (scikit-learn, aclsum); nothing is
downloaded.

* digits: the quickstart CNN (examples/quickstart.py) on scikit-learn's 8x8
  digits, sparse cross-entropy;
* breast_cancer: an MLP (30-32-32-1) on scikit-learn's breast cancer data,
  binary cross-entropy;
* diabetes: an MLP (10-32-32-1) on scikit-learn's diabetes data (features
  and target standardised on the training split), mean squared error;
* aclsum_t5: a tiny T5 (examples/t5_data.py: 2+2 layers, hidden 64, its own
  SentencePiece vocabulary), trained from scratch to write ACLSum "outcome"
  summaries, token-mean cross-entropy, 300 steps (batch 10);
* char_lm: a causal character-level transformer language model (2 pre-LN
  blocks, d_model 64, 4 heads, context 64) on the full text of the ACLSum
  papers (train split for training, val split for validation: split by
  paper), next-character cross-entropy, 300 steps (batch 32); metric:
  validation perplexity per character;
* embeddings: a two-tower next-word model whose parameters are mostly two
  Embedding(2000, 32) tables (context words, target words; 85 % of the
  151k parameters) with a small MLP between: the previous 4 words predict
  the next one, logits = MLP(context) · target table + bias; words from the
  ACLSum paper text, 1,999 most frequent training words + <unk>; 400 steps
  (batch 128); metric: validation top-1 accuracy;
* t5_finetune: the tiny T5 pretrained with span corruption on ACLSum paper
  text (examples/t5_pretrain.py; checkpoint made on first use under
  benchmarks/results/.cache/t5_pretrained/), fine-tuned to write the
  "outcome" summaries, 300 steps (batch 10, 30 passes over the 100
  training papers; encoder 128 tokens); every run starts from the same
  pretrained weights; metric: ROUGE-1/2/L (greedy generation) on the 50
  validation papers at the end.
"""

import functools
import math
import os
import re
import sys
from collections import Counter

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, os.path.join(ROOT, "examples")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

T5_CACHE = os.path.join(HERE, "results", ".cache", "t5_pretrained")


class Task:
    """A model, its data, its loss and a step budget.

    `epochs` x `steps_per_epoch()` steps, with one validation pass per
    epoch (the points of the validation curve). `metric` is (key, label,
    higher_is_better): the key is looked up in `final_metrics()`'s dict,
    then in the history (its last value). `metric_kind` says how to print
    it: "pct", "r2", "ppl" or "rouge". `quick=True` (the --quick smoke run)
    may shrink validation sets and one-time preparation.
    """

    name = ""
    title = ""
    batch_size = 32
    epochs = 10
    fixed_steps_per_epoch = None  # None: one pass over the training data
    metric = None  # (key, label, higher_is_better)
    metric_kind = "pct"
    seed_protocol = "all"  # "all": every lr x seed; "select": lr on seed 0

    def __init__(self, quick=False):
        self.quick = quick
        self._data = None

    def data(self):
        if self._data is None:
            self._data = self.load()
        return self._data

    def load(self):
        raise NotImplementedError

    def build(self, seed):
        raise NotImplementedError

    def compile(self, model, optimizer):
        raise NotImplementedError

    def fit_kwargs(self, seed=0):
        (x, y, sw), val = self.data()
        kw = dict(x=x, y=y, batch_size=self.batch_size,
                  validation_data=val, validation_batch_size=len(val[1]))
        if sw is not None:
            kw["sample_weight"] = sw
        return kw

    def steps_per_epoch(self):
        if self.fixed_steps_per_epoch:
            return self.fixed_steps_per_epoch
        n = len(self.data()[0][1])
        return int(math.ceil(n / self.batch_size))

    def add_metrics(self, hist):
        """Derived per-epoch metrics, added to the history in place."""

    def final_metrics(self, model):
        """Metrics of the trained model (after fit), or None."""
        return None

    def describe(self):
        """JSON-able facts about the task's data and model, for the report."""
        return {}


def _standardize(train, other):
    mean, std = train.mean(0), train.std(0) + 1e-8
    return (train - mean) / std, (other - mean) / std


def _mlp(n_in, seed, name):
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((n_in,)),
         layers.Dense(32, activation="relu"),
         layers.Dense(32, activation="relu"),
         layers.Dense(1)],
        name=name,
    )


# ------------------------------------------------------- scikit-learn tasks
class Digits(Task):
    name = "digits"
    title = "digits CNN (sklearn 8x8 digits, 38k params)"
    batch_size = 32
    epochs = 10
    metric = ("val_accuracy", "val acc", True)

    def load(self):
        import quickstart

        (x, y), val = quickstart.load_digits_data()
        return (x, y, None), val

    def build(self, seed):
        import quickstart

        return quickstart.build_cnn(seed)

    def compile(self, model, optimizer):
        import keras

        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )


class BreastCancer(Task):
    name = "breast_cancer"
    title = "breast_cancer MLP (binary cross-entropy)"
    batch_size = 32
    epochs = 20
    metric = ("val_accuracy", "val acc", True)

    def load(self):
        from sklearn.datasets import load_breast_cancer
        from sklearn.model_selection import train_test_split

        d = load_breast_cancer()
        x_tr, x_va, y_tr, y_va = train_test_split(
            d.data, d.target, train_size=448, stratify=d.target,
            random_state=0)
        x_tr, x_va = _standardize(x_tr, x_va)
        f = lambda a: a.astype("float32")  # noqa: E731
        return ((f(x_tr), f(y_tr[:, None]), None),
                (f(x_va), f(y_va[:, None])))

    def build(self, seed):
        return _mlp(30, seed, "breast_cancer_mlp")

    def compile(self, model, optimizer):
        import keras

        model.compile(
            optimizer=optimizer,
            loss=keras.losses.BinaryCrossentropy(from_logits=True),
            metrics=[keras.metrics.BinaryAccuracy(name="accuracy",
                                                  threshold=0.0)],
        )


class Diabetes(Task):
    name = "diabetes"
    title = "diabetes MLP (regression, standardised MSE)"
    batch_size = 32
    epochs = 30
    metric = ("val_r2", "val R²", True)
    metric_kind = "r2"

    def load(self):
        from sklearn.datasets import load_diabetes
        from sklearn.model_selection import train_test_split

        d = load_diabetes()
        x_tr, x_va, y_tr, y_va = train_test_split(
            d.data, d.target, train_size=352, random_state=0)
        x_tr, x_va = _standardize(x_tr, x_va)
        y_tr, y_va = _standardize(y_tr, y_va)
        self.val_var = float(np.var(y_va))
        f = lambda a: a.astype("float32")  # noqa: E731
        return ((f(x_tr), f(y_tr[:, None]), None),
                (f(x_va), f(y_va[:, None])))

    def build(self, seed):
        return _mlp(10, seed, "diabetes_mlp")

    def compile(self, model, optimizer):
        model.compile(optimizer=optimizer, loss="mean_squared_error")

    def add_metrics(self, hist):
        self.data()
        hist["val_r2"] = [1.0 - v / self.val_var for v in hist["val_loss"]]


def _compile_sparse_ce(model, optimizer):
    """Sparse cross-entropy on logits, accuracy as the metric."""
    import keras

    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


# ----------------------------------------------------------------- T5 tasks
class _Seq2SeqData:
    """fit() arguments for pre-tokenized T5 arrays."""

    def fit_kwargs(self, seed=0):
        # keras-hub's fit does not shuffle arrays: a shuffled tf.data
        # pipeline instead (the same order for every optimizer, per seed).
        import tensorflow as tf

        (x, y, sw), (xv, yv, swv) = self.data()
        train = (tf.data.Dataset.from_tensor_slices((x, y, sw))
                 .shuffle(len(y), seed=1000 + seed,
                          reshuffle_each_iteration=True))
        if self.fixed_steps_per_epoch:  # epochs of a fixed number of steps
            train = train.repeat()
        train = train.batch(self.batch_size, drop_remainder=True)
        val = tf.data.Dataset.from_tensor_slices((xv, yv, swv)).batch(len(yv))
        return dict(x=train, validation_data=val, shuffle=False)


class AclsumT5(_Seq2SeqData, Task):
    name = "aclsum_t5"
    title = "ACLSum tiny T5 from scratch (token cross-entropy)"
    batch_size = 10
    epochs = 30
    metric = ("val_acc", "val token acc", True)
    seed_protocol = "select"
    encoder_length = 64
    decoder_length = 32
    vocab_size = 500
    _proto = None

    def load(self):
        import t5_data as td

        train = td.load_aclsum("train", max_source_words=96)
        val = td.load_aclsum("val", max_source_words=96)
        texts = [t for pair in train for t in pair]
        self._proto = td.train_sentencepiece(texts, vocab_size=self.vocab_size)
        pre = td.build_tiny_t5(self._proto,
                               encoder_sequence_length=self.encoder_length,
                               decoder_sequence_length=self.decoder_length,
                               seed=0).preprocessor
        x, y, sw = td.preprocess_pairs(pre, train)
        xv, yv, swv = td.preprocess_pairs(pre, val)
        return (x, y, sw), (xv, yv, swv)

    def build(self, seed):
        import t5_data as td

        self.data()
        model = td.build_tiny_t5(self._proto,
                                 encoder_sequence_length=self.encoder_length,
                                 decoder_sequence_length=self.decoder_length,
                                 seed=seed)
        model.preprocessor = None  # fed pre-tokenized arrays
        return model

    def compile(self, model, optimizer):
        import t5_data as td

        td.compile_t5(model, optimizer)


class T5Finetune(_Seq2SeqData, Task):
    name = "t5_finetune"
    title = ("ACLSum tiny T5 fine-tuned from a span-corruption checkpoint "
             "(token cross-entropy, ROUGE)")
    batch_size = 10
    epochs = 10
    fixed_steps_per_epoch = 30  # 10 x 30 = 300 steps: 30 passes over 100 papers
    metric = ("rougeL", "val ROUGE-L", True)
    metric_kind = "rouge"
    seed_protocol = "select"
    encoder_length = 128
    decoder_length = 32
    max_source_words = 128
    aspect = "outcome"
    # Settings of examples/t5_pretrain.py (None: its defaults).
    pretrain = {}
    quick_pretrain = {"steps": 10}
    cache_dir = T5_CACHE
    quick_eval_docs = 8
    generate_batch = 25

    def __init__(self, quick=False):
        super().__init__(quick)
        self._gen = None
        self.checkpoint = None

    def load(self):
        import hashlib

        import t5_data as td
        import t5_pretrain as tp

        cfg = dict(self.quick_pretrain if self.quick else self.pretrain)
        self.checkpoint = tp.ensure_pretrained(self.cache_dir, **cfg)
        weights = os.path.join(self.checkpoint, "backbone.weights.h5")
        with open(weights, "rb") as f:
            self.checkpoint_sha256 = hashlib.sha256(f.read()).hexdigest()
        model, self._proto = tp.load_pretrained(
            self.checkpoint, encoder_sequence_length=self.encoder_length,
            decoder_sequence_length=self.decoder_length)
        pre = model.preprocessor
        train = td.load_aclsum("train", self.aspect,
                               max_source_words=self.max_source_words)
        val = td.load_aclsum("val", self.aspect,
                             max_source_words=self.max_source_words)
        self.eval_pairs = val[:self.quick_eval_docs] if self.quick else val
        x, y, sw = td.preprocess_pairs(pre, train)
        xv, yv, swv = td.preprocess_pairs(pre, val)
        return (x, y, sw), (xv, yv, swv)

    def build(self, seed):
        import t5_pretrain as tp

        self.data()
        # The same pretrained weights whatever the seed (the seed only
        # changes the batch order and dropout, through the harness).
        model, _ = tp.load_pretrained(
            self.checkpoint, encoder_sequence_length=self.encoder_length,
            decoder_sequence_length=self.decoder_length, seed=seed)
        model.preprocessor = None  # fed pre-tokenized arrays
        return model

    def compile(self, model, optimizer):
        import t5_data as td

        td.compile_t5(model, optimizer)

    def final_metrics(self, model):
        """ROUGE-1/2/L (F1 %, stemmed) of greedy summaries of the
        validation papers, by a generation copy of the trained model."""
        import keras

        import t5_data as td
        import t5_pretrain as tp

        if self._gen is None:  # one per task: generate() compiles once
            self._gen, _ = tp.load_pretrained(
                self.checkpoint, encoder_sequence_length=self.encoder_length,
                decoder_sequence_length=self.decoder_length)
            td.compile_t5(self._gen, keras.optimizers.SGD())
        self._gen.backbone.set_weights(model.backbone.get_weights())
        sources = [s for s, _ in self.eval_pairs]
        refs = [t for _, t in self.eval_pairs]
        batch = min(self.generate_batch, len(sources))
        preds = td.generate_summaries(self._gen, sources, batch_size=batch,
                                      max_length=self.decoder_length)
        # Sentinels are pretraining pieces, not words.
        preds = [" ".join(re.sub(r"<extra_id_\d+>", " ", p).split())
                 for p in preds]
        out = td.rouge_scores(preds, refs)
        out["examples"] = [{"prediction": p, "reference": r}
                           for p, r in list(zip(preds, refs))[:2]]
        return out

    def describe(self):
        self.data()
        return {"checkpoint": os.path.relpath(self.checkpoint, ROOT),
                "checkpoint_sha256": self.checkpoint_sha256,
                "eval_docs": len(self.eval_pairs)}


# ------------------------------------------------------- ACLSum text tasks
def _paper_documents(split):
    import t5_pretrain as tp

    return tp.paper_documents((split,))


class CharLM(Task):
    name = "char_lm"
    title = ("char-level causal transformer LM on ACLSum paper text "
             "(2 blocks, d_model 64, context 64)")
    batch_size = 32
    epochs = 10
    fixed_steps_per_epoch = 30
    metric = ("val_ppl", "val perplexity", False)
    metric_kind = "ppl"
    seed_protocol = "select"
    context = 64
    d_model = 64
    num_heads = 4
    num_blocks = 2
    mlp_dim = 256
    min_char_count = 20  # rarer training characters map to <unk> (id 0)
    val_windows = 512
    quick_val_windows = 64

    def load(self):
        train = "\n".join("\n".join(d) for d in _paper_documents("train"))
        val = "\n".join("\n".join(d) for d in _paper_documents("val"))
        counts = Counter(train)
        chars = sorted(c for c, n in counts.items() if n >= self.min_char_count)
        self.vocab = ["<unk>"] + chars
        index = {c: i + 1 for i, c in enumerate(chars)}

        def windows(text):
            ids = np.fromiter((index.get(c, 0) for c in text), "int32",
                              count=len(text))
            n = (len(ids) - 1) // self.context
            x = ids[:n * self.context].reshape(n, self.context)
            y = ids[1:n * self.context + 1].reshape(n, self.context)
            return x, y

        x, y = windows(train)
        keep = len(y) - len(y) % self.batch_size  # one batch shape
        xv, yv = windows(val)
        nv = self.quick_val_windows if self.quick else self.val_windows
        pick = np.linspace(0, len(yv) - 1, min(nv, len(yv))).astype(int)
        self.chars = {"train": len(train), "val": len(val)}
        return (x[:keep], y[:keep], None), (xv[pick], yv[pick])

    def build(self, seed):
        import keras
        from keras import layers

        self.data()
        keras.utils.set_random_seed(seed)
        v, d = len(self.vocab), self.d_model
        inp = keras.Input((self.context,), dtype="int32", name="chars")
        h = layers.Embedding(v, d, name="char_embedding")(inp)
        h = _PositionEmbedding(self.context, d, name="position_embedding")(h)
        for i in range(self.num_blocks):
            a = layers.LayerNormalization(epsilon=1e-5, name=f"ln_attn_{i}")(h)
            a = layers.MultiHeadAttention(
                self.num_heads, d // self.num_heads, name=f"attention_{i}")(
                    a, a, use_causal_mask=True)
            h = layers.Add(name=f"res_attn_{i}")([h, a])
            m = layers.LayerNormalization(epsilon=1e-5, name=f"ln_mlp_{i}")(h)
            m = layers.Dense(self.mlp_dim, activation="gelu",
                             name=f"mlp_in_{i}")(m)
            m = layers.Dense(d, name=f"mlp_out_{i}")(m)
            h = layers.Add(name=f"res_mlp_{i}")([h, m])
        h = layers.LayerNormalization(epsilon=1e-5, name="ln_final")(h)
        logits = layers.Dense(v, name="logits")(h)
        return keras.Model(inp, logits, name="char_lm")

    def compile(self, model, optimizer):
        _compile_sparse_ce(model, optimizer)

    def add_metrics(self, hist):
        hist["val_ppl"] = [math.exp(min(v, 700.0)) for v in hist["val_loss"]]

    def describe(self):
        (x, _, _), (xv, _) = self.data()
        return {"vocab": len(self.vocab), "train_chars": self.chars["train"],
                "val_chars": self.chars["val"], "train_windows": len(x),
                "val_windows": len(xv)}


class Embeddings(Task):
    name = "embeddings"
    title = ("two-tower next-word model on ACLSum text "
             "(2 x Embedding(2000, 32) + MLP)")
    batch_size = 128
    epochs = 10
    fixed_steps_per_epoch = 40
    metric = ("val_accuracy", "val top-1 acc", True)
    seed_protocol = "all"  # cheap: every lr x seed
    vocab_size = 2000  # including <unk> = 0
    context = 4
    dim = 32
    hidden = 128
    val_examples = 4096
    quick_val_examples = 256
    _word = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")

    def _words(self, doc):
        return self._word.findall(" ".join(doc).lower())

    def load(self):
        train_docs = [self._words(d) for d in _paper_documents("train")]
        val_docs = [self._words(d) for d in _paper_documents("val")]
        counts = Counter(w for d in train_docs for w in d)
        words = [w for w, _ in counts.most_common(self.vocab_size - 1)]
        self.vocab = ["<unk>"] + words
        index = {w: i + 1 for i, w in enumerate(words)}

        def examples(docs):
            xs, ys = [], []
            for d in docs:  # contexts never cross papers
                ids = np.array([index.get(w, 0) for w in d], "int32")
                if len(ids) <= self.context:
                    continue
                win = np.lib.stride_tricks.sliding_window_view(
                    ids, self.context + 1)
                win = win[win[:, -1] != 0]  # <unk> is never a target
                xs.append(win[:, :-1])
                ys.append(win[:, -1])
            return np.concatenate(xs), np.concatenate(ys)

        x, y = examples(train_docs)
        keep = len(y) - len(y) % self.batch_size
        xv, yv = examples(val_docs)
        nv = self.quick_val_examples if self.quick else self.val_examples
        pick = np.linspace(0, len(yv) - 1, min(nv, len(yv))).astype(int)
        n_tok = sum(map(len, train_docs))
        self.stats = {"train_words": n_tok,
                      "unk_rate": float(np.mean(
                          [index.get(w, 0) == 0
                           for d in train_docs for w in d]))}
        return (x[:keep], y[:keep], None), (xv[pick], yv[pick])

    def build(self, seed):
        import keras
        from keras import layers

        self.data()
        keras.utils.set_random_seed(seed)
        inp = keras.Input((self.context,), dtype="int32", name="context")
        e = layers.Embedding(self.vocab_size, self.dim,
                             name="context_embedding")(inp)
        h = layers.Flatten(name="flatten")(e)
        h = layers.Dense(self.hidden, activation="relu", name="mlp_in")(h)
        h = layers.Dense(self.dim, name="mlp_out")(h)
        logits = _TargetTower(self.vocab_size, self.dim,
                              name="target_tower")(h)
        return keras.Model(inp, logits, name="two_tower_next_word")

    def compile(self, model, optimizer):
        _compile_sparse_ce(model, optimizer)

    def describe(self):
        (x, _, _), (xv, _) = self.data()
        return dict(self.stats, vocab=self.vocab_size,
                    train_examples=len(x), val_examples=len(xv))


# ------------------------------------------------------------------ layers
@functools.lru_cache(maxsize=None)
def _layer_classes():
    """(PositionEmbedding, TargetTower), defined once Keras is imported."""
    from keras import layers, ops

    class PositionEmbedding(layers.Layer):
        """Adds a learned (length, dim) position table to its input."""

        def __init__(self, length, dim, **kwargs):
            super().__init__(**kwargs)
            self.length, self.dim = length, dim
            self.embedding = layers.Embedding(length, dim, name="embedding")

        def build(self, input_shape):
            self.embedding.build((None,))
            self.built = True

        def call(self, x):
            return x + self.embedding(ops.arange(ops.shape(x)[1]))[None]

        def get_config(self):
            return dict(super().get_config(), length=self.length,
                        dim=self.dim)

    class TargetTower(layers.Layer):
        """logits = h · table^T + bias: the target side of a two-tower
        model, one Embedding(vocab, dim) row per candidate word."""

        def __init__(self, vocab, dim, **kwargs):
            super().__init__(**kwargs)
            self.vocab, self.dim = vocab, dim
            self.table = layers.Embedding(vocab, dim, name="target_embedding")

        def build(self, input_shape):
            self.table.build((None,))
            self.bias = self.add_weight((self.vocab,), initializer="zeros",
                                        name="bias")
            self.built = True

        def call(self, h):
            return (ops.matmul(h, ops.transpose(self.table.embeddings))
                    + self.bias)

        def compute_output_shape(self, input_shape):
            return tuple(input_shape[:-1]) + (self.vocab,)

        def get_config(self):
            return dict(super().get_config(), vocab=self.vocab, dim=self.dim)

    return PositionEmbedding, TargetTower


def _PositionEmbedding(length, dim, name):
    return _layer_classes()[0](length, dim, name=name)


def _TargetTower(vocab, dim, name):
    return _layer_classes()[1](vocab, dim, name=name)


TASKS = {t.name: t for t in (Digits, BreastCancer, Diabetes, AclsumT5,
                             CharLM, Embeddings, T5Finetune)}
