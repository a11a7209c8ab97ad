"""Pretrain the tiny KerasHub T5 on ACLSum paper text with span corruption.

Offline: the text is the full paper text (abstract + body paragraphs of the
S2ORC-style parses under `aclsum/dataset/paper_jsons/`) that ships inside
the PyPI package `aclsum`, of the papers in its *train* and *test* splits
(200 papers, ~5.5 M characters). The *val* split (50 papers) is left out
entirely: the convergence suite's `t5_finetune` task evaluates on it.

    KERAS_BACKEND=jax python examples/t5_pretrain.py             # 600 steps
    KERAS_BACKEND=jax python examples/t5_pretrain.py --steps 300

What it does:

* Tokenizer: a SentencePiece unigram model (`--vocab-size`, default 1000)
  trained on the paragraphs, with T5's special ids (`<pad>`=0, `</s>`=1,
  `<unk>`=2) as in `t5_data.train_sentencepiece`, plus `--sentinels`
  (default 32) *reserved* pieces `<extra_id_0>`, `<extra_id_1>`, ... as
  SentencePiece user-defined symbols. They take the ids right after the
  special ones (3, 4, ...; T5 numbers them down from the top of the
  vocabulary instead: only consistency matters) and count towards the
  vocabulary size; SentencePiece never produces them from ordinary text.
* Span corruption (T5, Raffel et al. 2020, section 3.1.4): the token stream
  is cut into segments of n tokens; in each, 15 % of the tokens
  (`--noise-density`) in spans of mean length 3 (`--mean-span-length`) are
  replaced, one span per sentinel, in the encoder input; the target is
  sentinel_0 span_0 sentinel_1 span_1 ... </s>. n is the largest length
  whose corrupted input fits `--encoder-length` (default 128) and target
  `--decoder-length` (32); here n = 141. The span positions are drawn once
  per segment (fixed seed), so a run is reproducible.
* Model: `t5_data.build_tiny_t5` (2+2 layers, hidden 64, dropout 0.1, tied
  embeddings), trained with Adam (lr `--lr`, default 3e-3, linear warm-up
  over 10 % of the steps, then cosine decay to 10 %), batch 16, token-mean
  cross-entropy. 256 held-out segments give a validation loss.
* Output, under `--cache-dir` (default
  `benchmarks/results/.cache/t5_pretrained/`), in a subfolder named by the
  settings (so that a --quick checkpoint never replaces the full one):
  `backbone.weights.h5` (the `T5Backbone` weights), `spm.model` (the
  SentencePiece proto) and `config.json` (settings, losses, time).

`ensure_pretrained(...)` returns that folder, pretraining first if it does
not hold a checkpoint yet; `load_pretrained(folder, ...)` builds a
`T5Seq2SeqLM` (with its preprocessor) from it. The convergence suite's
`t5_finetune` task uses both, so every fine-tuning run starts from the same
weights.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import t5_data as td  # noqa: E402

DEFAULT_CACHE = os.path.join(os.path.dirname(HERE), "benchmarks", "results",
                             ".cache", "t5_pretrained")
PRETRAIN_SPLITS = ("train", "test")  # never "val": fine-tuning evaluates there

DEFAULTS = {
    "steps": 600,
    "batch_size": 16,
    "lr": 3e-3,
    "vocab_size": 1000,
    "sentinels": 32,
    "encoder_length": 128,
    "decoder_length": 32,
    "noise_density": 0.15,
    "mean_span_length": 3.0,
    "seed": 0,
}


# ---------------------------------------------------------------------- text
def paper_documents(splits=PRETRAIN_SPLITS):
    """One list of paragraph strings (abstract + body, whitespace
    normalised) per ACLSum paper in `splits`, in the package's order.

    Falls back to the section sentences (abstract, introduction,
    conclusion) of a paper whose full-text parse is missing.
    """
    from aclsum import ACLSum

    docs = []
    for split in splits:
        for doc in ACLSum(split).documents:
            try:
                parse = doc.get_fulltext_parse()["pdf_parse"]
                paras = [p["text"] for p in
                         parse.get("abstract", []) + parse.get("body_text", [])]
            except (OSError, KeyError, TypeError, ValueError):
                paras = [" ".join(doc.get_all_sentences())]
            docs.append([" ".join(p.split()) for p in paras
                         if p and p.strip()])
    return docs


def paper_paragraphs(splits=PRETRAIN_SPLITS):
    """All paragraphs of `paper_documents(splits)`, in one list."""
    return [p for doc in paper_documents(splits) for p in doc]


def sentinel_pieces(n):
    return [f"<extra_id_{i}>" for i in range(n)]


def train_tokenizer(paragraphs, vocab_size=1000, sentinels=32):
    """SentencePiece proto (bytes) with T5's special ids and `sentinels`
    reserved user-defined pieces at ids 3 .. 3 + sentinels - 1."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(paragraphs),
        model_writer=buf,
        vocab_size=int(vocab_size),
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        max_sentence_length=1 << 15,  # paragraphs, not sentences
        bos_id=-1,
        pad_id=td.PAD_ID,
        eos_id=td.EOS_ID,
        unk_id=td.UNK_ID,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        user_defined_symbols=sentinel_pieces(sentinels),
        minloglevel=2,
    )
    return buf.getvalue()


def sentinel_ids(proto, n):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=proto)
    ids = [sp.piece_to_id(p) for p in sentinel_pieces(n)]
    if any(i == sp.unk_id() for i in ids):
        raise ValueError("the tokenizer does not reserve the sentinel pieces")
    return ids


def tokenize(proto, paragraphs):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=proto)
    return np.concatenate([np.asarray(ids, dtype="int32")
                           for ids in sp.encode(paragraphs)])


# ----------------------------------------------------------- span corruption
def corrupted_lengths(n, noise_density=0.15, mean_span_length=3.0):
    """(noise tokens, spans, input length, target length) for n tokens;
    the lengths include the final </s>."""
    num_noise = min(max(int(round(n * noise_density)), 1), n - 1)
    num_spans = max(int(round(num_noise / mean_span_length)), 1)
    return (num_noise, num_spans, n - num_noise + num_spans + 1,
            num_noise + num_spans + 1)


def segment_length(encoder_length, decoder_length, noise_density=0.15,
                   mean_span_length=3.0):
    """Largest n whose corrupted input and target fit the two lengths."""
    n = 2
    while True:
        _, _, li, lt = corrupted_lengths(n + 1, noise_density,
                                         mean_span_length)
        if li > encoder_length or lt > decoder_length:
            return n
        n += 1


def _random_segmentation(num_items, num_segments, rng):
    """`num_segments` positive lengths summing to `num_items`."""
    cuts = np.sort(rng.choice(np.arange(1, num_items), num_segments - 1,
                              replace=False))
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def span_corrupt(tokens, rng, sentinels, noise_density=0.15,
                 mean_span_length=3.0):
    """T5 span corruption of one segment: (inputs, targets), each ending in
    </s>. Spans alternate with kept runs, a kept run first."""
    n = len(tokens)
    num_noise, num_spans, _, _ = corrupted_lengths(n, noise_density,
                                                   mean_span_length)
    num_spans = min(num_spans, num_noise, n - num_noise, len(sentinels))
    noise = _random_segmentation(num_noise, num_spans, rng)
    keep = _random_segmentation(n - num_noise, num_spans, rng)
    inputs, targets, i = [], [], 0
    for s, (k, m) in enumerate(zip(keep, noise)):
        inputs.extend(tokens[i:i + k])
        i += k
        inputs.append(sentinels[s])
        targets.append(sentinels[s])
        targets.extend(tokens[i:i + m])
        i += m
    return inputs + [td.EOS_ID], targets + [td.EOS_ID]


def make_examples(tokens, rng, sentinels, encoder_length, decoder_length,
                  noise_density=0.15, mean_span_length=3.0):
    """Span-corrupted (x, y, sample_weight) arrays in the layout of
    `T5Seq2SeqLMPreprocessor` (decoder input: <pad> + target; labels:
    target; weights: 1 on target tokens)."""
    n = segment_length(encoder_length, decoder_length, noise_density,
                       mean_span_length)
    count = len(tokens) // n
    enc = np.zeros((count, encoder_length), "int32")
    dec = np.zeros((count, decoder_length), "int32")
    y = np.zeros((count, decoder_length), "int32")
    for j in range(count):
        inp, tgt = span_corrupt(tokens[j * n:(j + 1) * n], rng, sentinels,
                                noise_density, mean_span_length)
        enc[j, :len(inp)] = inp
        y[j, :len(tgt)] = tgt
        dec[j, 1:len(tgt)] = tgt[:-1]
    sw = (y != td.PAD_ID).astype("float32")
    # The preprocessor's decoder mask: the <pad> start, then every label
    # position up to and including </s>.
    dec_mask = np.ones((count, decoder_length), bool)
    dec_mask[:, 1:] = y[:, :-1] != td.PAD_ID
    x = {"encoder_token_ids": enc,
         "encoder_padding_mask": enc != td.PAD_ID,
         "decoder_token_ids": dec,
         "decoder_padding_mask": dec_mask}
    return x, y, sw, n


# -------------------------------------------------------------------- cache
def config_key(cfg):
    return ("v{vocab_size}-s{steps}-b{batch_size}-lr{lr:g}-e{encoder_length}"
            "-d{decoder_length}-seed{seed}").format(**cfg)


def _complete(cfg):
    out = dict(DEFAULTS)
    out.update({k: v for k, v in cfg.items() if v is not None})
    unknown = set(out) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown pretraining settings {sorted(unknown)}")
    return out


def checkpoint_dir(cache_dir=DEFAULT_CACHE, **cfg):
    return os.path.join(cache_dir, config_key(_complete(cfg)))


def is_complete(path):
    return all(os.path.exists(os.path.join(path, f)) for f in
               ("backbone.weights.h5", "spm.model", "config.json"))


def ensure_pretrained(cache_dir=DEFAULT_CACHE, log=print, verbose=0, **cfg):
    """The checkpoint folder for these settings; pretrains if it is missing."""
    path = checkpoint_dir(cache_dir, **cfg)
    if not is_complete(path):
        log(f"[t5_pretrain] no checkpoint at {path}: pretraining "
            f"({_complete(cfg)['steps']} steps) ...")
        pretrain(path, verbose=verbose, log=log, **cfg)
    return path


def load_pretrained(path, *, encoder_sequence_length=None,
                    decoder_sequence_length=None, seed=0):
    """(T5Seq2SeqLM with preprocessor, proto) from a checkpoint folder."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)["config"]
    with open(os.path.join(path, "spm.model"), "rb") as f:
        proto = f.read()
    model = td.build_tiny_t5(
        proto,
        encoder_sequence_length=encoder_sequence_length
        or cfg["encoder_length"],
        decoder_sequence_length=decoder_sequence_length
        or cfg["decoder_length"],
        seed=seed)
    model.backbone.load_weights(os.path.join(path, "backbone.weights.h5"))
    return model, proto


# ----------------------------------------------------------------- pretrain
def _epochs_for(steps, most=10):
    return max(d for d in range(1, most + 1) if steps % d == 0)


def pretrain(out_dir, *, verbose=1, log=print, **cfg):
    import keras
    import tensorflow as tf

    cfg = _complete(cfg)
    t0 = time.perf_counter()
    paragraphs = paper_paragraphs()
    proto = train_tokenizer(paragraphs, cfg["vocab_size"], cfg["sentinels"])
    sents = sentinel_ids(proto, cfg["sentinels"])
    tokens = tokenize(proto, paragraphs)
    rng = np.random.default_rng(cfg["seed"])
    x, y, sw, n = make_examples(tokens, rng, sents, cfg["encoder_length"],
                                cfg["decoder_length"], cfg["noise_density"],
                                cfg["mean_span_length"])
    n_val = min(256, max(1, len(y) // 50))
    perm = np.random.default_rng(cfg["seed"] + 1).permutation(len(y))
    tr, va = perm[n_val:], perm[:n_val]
    take = lambda d, i: {k: v[i] for k, v in d.items()}  # noqa: E731
    log(f"[t5_pretrain] {len(paragraphs)} paragraphs, {len(tokens):,} tokens,"
        f" {len(tr)} train / {len(va)} val segments of {n} tokens; "
        f"tokenizer + corruption {time.perf_counter() - t0:.1f}s")

    model = td.build_tiny_t5(proto,
                             encoder_sequence_length=cfg["encoder_length"],
                             decoder_sequence_length=cfg["decoder_length"],
                             seed=cfg["seed"])
    model.preprocessor = None  # fed token ids
    steps = int(cfg["steps"])
    warmup = max(1, steps // 10)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=max(1, steps - warmup),
        alpha=0.1, warmup_target=cfg["lr"], warmup_steps=warmup)
    td.compile_t5(model, keras.optimizers.Adam(learning_rate=schedule))
    train = (tf.data.Dataset.from_tensor_slices((take(x, tr), y[tr], sw[tr]))
             .shuffle(len(tr), seed=cfg["seed"], reshuffle_each_iteration=True)
             .repeat().batch(cfg["batch_size"], drop_remainder=True))
    val = tf.data.Dataset.from_tensor_slices(
        (take(x, va), y[va], sw[va])).batch(n_val)
    epochs = _epochs_for(steps)
    t1 = time.perf_counter()
    hist = model.fit(train, epochs=epochs, steps_per_epoch=steps // epochs,
                     validation_data=val, verbose=verbose)
    train_s = time.perf_counter() - t1
    history = {k: [float(v) for v in vs] for k, vs in hist.history.items()}
    log(f"[t5_pretrain] {steps} steps in {train_s:.0f}s: train loss "
        f"{history['loss'][0]:.3f} -> {history['loss'][-1]:.3f}, val loss "
        f"{history['val_loss'][-1]:.3f} (span-corruption targets)")

    os.makedirs(out_dir, exist_ok=True)
    model.backbone.save_weights(os.path.join(out_dir, "backbone.weights.h5"))
    with open(os.path.join(out_dir, "spm.model"), "wb") as f:
        f.write(proto)
    info = {
        "config": cfg,
        "splits": list(PRETRAIN_SPLITS),
        "paragraphs": len(paragraphs),
        "tokens": int(len(tokens)),
        "segment_tokens": n,
        "train_segments": int(len(tr)),
        "val_segments": int(len(va)),
        "vocabulary_size": int(model.backbone.vocabulary_size),
        "sentinel_ids": [int(s) for s in sents],
        "optimizer": (f"Adam, lr {cfg['lr']:g}: linear warm-up {warmup} "
                      "steps, cosine decay to 10 %"),
        "history": history,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "backend": keras.backend.backend(),
        "versions": {"keras": keras.__version__,
                     "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--vocab-size", type=int, default=DEFAULTS["vocab_size"])
    p.add_argument("--sentinels", type=int, default=DEFAULTS["sentinels"])
    p.add_argument("--encoder-length", type=int,
                   default=DEFAULTS["encoder_length"])
    p.add_argument("--decoder-length", type=int,
                   default=DEFAULTS["decoder_length"])
    p.add_argument("--noise-density", type=float,
                   default=DEFAULTS["noise_density"])
    p.add_argument("--mean-span-length", type=float,
                   default=DEFAULTS["mean_span_length"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--force", action="store_true",
                   help="pretrain again even if the checkpoint exists")
    p.add_argument("--verbose", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = {k: getattr(args, k) for k in DEFAULTS}
    path = checkpoint_dir(args.cache_dir, **cfg)
    if is_complete(path) and not args.force:
        print(f"checkpoint exists: {path} (--force to redo)")
        return 0
    info = pretrain(path, verbose=args.verbose, **cfg)
    print(f"wrote {path} ({info['train_seconds']:.0f}s of training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
