"""Offline data, tokenizer and model utilities for the T5 summarization example.

Everything here runs without network access:

* `load_aclsum` reads the ACLSum corpus (aspect-based summaries of ACL papers)
  that ships *inside* the PyPI package `aclsum` (jsonl files under
  `aclsum/dataset/`, read through `aclsum.ACLSum`).
* `train_sentencepiece` trains a SentencePiece model in-process, with T5's
  special ids (`<pad>`=0, `</s>`=1, `<unk>`=2), and returns the serialized
  proto as bytes, which `keras_hub.models.T5Tokenizer(proto=...)` accepts.
* `build_tiny_t5` builds a randomly initialised `keras_hub.models.T5Seq2SeqLM`
  from a small `T5Backbone` config plus a `T5Seq2SeqLMPreprocessor`, so no
  preset has to be downloaded.

`load_t5_preset` and `load_xsum` are the network path (pretrained
`t5_small_multi` fine-tuned on XSUM through tensorflow-datasets); offline
they raise `ResourceUnavailableError` with a message that says why.

Import this module with the Keras backend already chosen (`KERAS_BACKEND`),
as for any Keras code.
"""

from __future__ import annotations

import io
import os
import re

ASPECTS = ("challenge", "approach", "outcome")
SECTIONS = ("abstract", "introduction", "conclusion")
# Sections in the order they are packed into a (truncated) source: abstract
# and conclusion carry most of what the reference summaries say, the
# introduction is the longest and least dense, so it goes last.
DEFAULT_SECTIONS = ("abstract", "conclusion", "introduction")
# The package's own split names and sizes (250 papers in all). Note that
# `wc -l` on the jsonl files says 99/49/99: the last line has no newline.
SPLIT_SIZES = {"train": 100, "val": 50, "test": 100}
_SPLIT_ALIASES = {
    "validation": "val",
    "valid": "val",
    "dev": "val",
    "training": "train",
}
DEFAULT_PREFIX = "summarize: "

# T5's special tokens; T5Tokenizer requires exactly these pieces.
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2

TINY_T5_CONFIG = {
    "num_layers": 2,
    "num_heads": 4,
    "hidden_dim": 64,
    "intermediate_dim": 128,
    "key_value_dim": None,  # hidden_dim // num_heads = 16
    "dropout": 0.1,
    "activation": "relu",
    "use_gated_activation": True,
    "tie_embedding_weights": True,
}


class ResourceUnavailableError(RuntimeError):
    """A preset or data set that needs the network could not be loaded."""


# --------------------------------------------------------------------------
# ACLSum
# --------------------------------------------------------------------------
def _canonical_split(split):
    s = _SPLIT_ALIASES.get(split, split)
    if s not in SPLIT_SIZES:
        raise ValueError(
            f"Unknown ACLSum split {split!r}; expected one of "
            f"{sorted(SPLIT_SIZES)} (or 'validation')."
        )
    return s


def truncate_sentences(sentences, max_words):
    """Join whole sentences until `max_words` words; cut the one that overflows.

    Returns the truncated text. `max_words=None` keeps everything.
    """
    out, n = [], 0
    for sent in sentences:
        words = sent.split()
        if not words:
            continue
        if max_words is not None and n + len(words) > max_words:
            room = max_words - n
            if room > 0 and not out:
                # The first sentence alone is too long: keep its head.
                out.append(" ".join(words[:room]))
            break
        out.append(" ".join(words))
        n += len(words)
    return " ".join(out)


def load_aclsum(
    split,
    aspect="outcome",
    *,
    max_source_words=256,
    sections=DEFAULT_SECTIONS,
    limit=None,
):
    """Return ACLSum `split` as a list of `(source_text, summary_text)` pairs.

    Args:
        split: `"train"` (100 papers), `"val"` / `"validation"` (50) or
            `"test"` (100).
        aspect: which reference summary to target: `"challenge"`,
            `"approach"` or `"outcome"` (one sentence-ish each, ~20 words).
        max_source_words: the source is the papers' section sentences (about
            1,000 words on average), packed whole-sentence by whole-sentence
            in `sections` order until this many words; `None` keeps all.
            The model's preprocessor truncates again to its own encoder
            length in tokens, so this mostly keeps tokenization cheap.
        sections: which sections to use, in packing order. Defaults to
            abstract, conclusion, introduction.
        limit: keep only the first `limit` papers (for quick runs and tests).
    """
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise ValueError(f"Unknown sections {bad}; expected some of {SECTIONS}")
    from aclsum import ACLSum

    docs = ACLSum(_canonical_split(split)).documents
    if limit is not None:
        docs = docs[:limit]
    pairs = []
    for doc in docs:
        sents = [s for sec in sections for s in doc.sentences.get(sec, [])]
        source = truncate_sentences(sents, max_source_words)
        summary = " ".join(doc.summaries[aspect].split())
        pairs.append((source, summary))
    return pairs


def to_features(pairs, prefix=DEFAULT_PREFIX):
    """`[(source, summary)]` -> the string dict `T5Seq2SeqLM.fit` expects."""
    return {
        "encoder_text": [prefix + src for src, _ in pairs],
        "decoder_text": [tgt for _, tgt in pairs],
    }


# --------------------------------------------------------------------------
# SentencePiece
# --------------------------------------------------------------------------
def train_sentencepiece(
    texts,
    vocab_size=1000,
    model_prefix_dir=None,
    *,
    model_type="unigram",
    character_coverage=1.0,
    num_threads=1,
    seed_sentencepiece_size=100_000,
):
    """Train a SentencePiece model on `texts`; return the proto as bytes.

    Uses T5's special ids: `<pad>`=0, `</s>`=1, `<unk>`=2 and no `<s>`.
    `vocab_size` is a soft limit (`hard_vocab_limit=False`): on a small
    corpus SentencePiece may produce fewer pieces instead of failing, so
    read the real size from `T5Tokenizer(proto=...).vocabulary_size()`.

    If `model_prefix_dir` is given, the proto is also written there as
    `spm.model` (created if needed), for inspection or reuse.
    """
    import sentencepiece as spm

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("train_sentencepiece needs at least one non-empty text")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        vocab_size=int(vocab_size),
        model_type=model_type,
        character_coverage=character_coverage,
        hard_vocab_limit=False,
        num_threads=num_threads,
        seed_sentencepiece_size=seed_sentencepiece_size,
        bos_id=-1,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    proto = buf.getvalue()
    if model_prefix_dir is not None:
        os.makedirs(model_prefix_dir, exist_ok=True)
        with open(os.path.join(model_prefix_dir, "spm.model"), "wb") as f:
            f.write(proto)
    return proto


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------
def build_tiny_t5(
    proto,
    *,
    encoder_sequence_length=128,
    decoder_sequence_length=32,
    seed=None,
    package="keras_hub",
    **backbone_overrides,
):
    """A small randomly initialised `keras_hub.models.T5Seq2SeqLM`.

    ``package="keras_nlp"`` builds it through KerasNLP's names
    (`keras_nlp.models.T5Seq2SeqLM`, the same classes re-exported).

    `proto` is a SentencePiece proto (bytes or a path), e.g. from
    `train_sentencepiece`. The backbone is `TINY_T5_CONFIG` (2 encoder + 2
    decoder layers, hidden 64, 4 heads, gated-ReLU FFN 128, tied embeddings)
    with `vocabulary_size` taken from the tokenizer; any `T5Backbone`
    argument can be overridden by keyword. The attached
    `T5Seq2SeqLMPreprocessor` packs encoder inputs as `tokens + </s>` and
    decoder inputs as `<pad> + tokens` with labels `tokens + </s>` and
    `sample_weight` = the label padding mask.

    The model is returned uncompiled: see `compile_t5`.
    """
    import importlib

    import keras

    models = importlib.import_module(package).models
    if seed is not None:
        keras.utils.set_random_seed(seed)
    tokenizer = models.T5Tokenizer(proto=proto)
    preprocessor = models.T5Seq2SeqLMPreprocessor(
        tokenizer=tokenizer,
        encoder_sequence_length=encoder_sequence_length,
        decoder_sequence_length=decoder_sequence_length,
    )
    config = dict(TINY_T5_CONFIG)
    config.update(backbone_overrides)
    backbone = models.T5Backbone(
        vocabulary_size=tokenizer.vocabulary_size(), **config
    )
    return models.T5Seq2SeqLM(
        backbone=backbone, preprocessor=preprocessor
    )


def seq2seq_loss(token_mean=True):
    """Sparse cross-entropy on logits, as `T5Seq2SeqLM.compile` defaults to.

    Padding is excluded through the `sample_weight` that the preprocessor
    yields (0 on padded label positions). With the default Keras reduction
    (`"sum_over_batch_size"`) the weighted sum is divided by *all* label
    positions, pads included, so the loss shrinks with the amount of
    padding; `token_mean=True` uses `"mean_with_sample_weight"` instead,
    which divides by the number of real tokens (per-token NLL, so
    `exp(loss)` is the perplexity).
    """
    import keras

    reduction = "mean_with_sample_weight" if token_mean else "sum_over_batch_size"
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=reduction
    )


def compile_t5(model, optimizer, *, sampler="greedy", token_mean=True, **kwargs):
    """Compile a T5Seq2SeqLM for fine-tuning and greedy `generate()`.

    Token accuracy is a `weighted_metric`, so it too ignores padding.
    """
    import keras

    model.compile(
        optimizer=optimizer,
        loss=seq2seq_loss(token_mean),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")],
        sampler=sampler,
        **kwargs,
    )
    return model


def preprocess_pairs(preprocessor, pairs, prefix=DEFAULT_PREFIX):
    """Tokenize pairs once into numpy `(x, y, sample_weight)`.

    For calling the model directly (`model(x)`, `model.compute_loss`) on
    token ids. Note that while a preprocessor is attached, `fit()`,
    `train_on_batch()` and `evaluate()` expect the *string* dict from
    `to_features` (keras-hub preprocesses it), not these arrays.
    """
    import keras
    import numpy as np

    out = preprocessor(to_features(pairs, prefix))
    x, y, sw = keras.utils.unpack_x_y_sample_weight(out)
    x = {k: np.asarray(keras.ops.convert_to_numpy(v)) for k, v in x.items()}
    y = np.asarray(keras.ops.convert_to_numpy(y))
    sw = np.asarray(keras.ops.convert_to_numpy(sw)).astype("float32")
    return x, y, sw


def generate_summaries(model, sources, *, batch_size=16, max_length=None,
                       prefix=DEFAULT_PREFIX):
    """Greedy (or whatever sampler was compiled) summaries for `sources`."""
    outs = []
    for i in range(0, len(sources), batch_size):
        batch = [prefix + s for s in sources[i:i + batch_size]]
        gen = model.generate(batch, max_length=max_length)
        if isinstance(gen, str):
            gen = [gen]
        outs.extend(_clean(g) for g in gen)
    return outs


def _clean(text):
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return re.sub(r"\s+", " ", str(text)).strip()


def rouge_scores(predictions, references):
    """Mean ROUGE-1/2/L F1 (in %, stemmed) with the `rouge-score` package."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for pred, ref in zip(predictions, references):
        s = scorer.score(ref, pred)
        for k in keys:
            totals[k] += s[k].fmeasure
    n = max(len(predictions), 1)
    return {k: 100.0 * v / n for k, v in totals.items()}


# --------------------------------------------------------------------------
# Network path (pretrained preset + XSUM); raises offline.
# --------------------------------------------------------------------------
def load_t5_preset(preset="t5_small_multi", *, encoder_sequence_length=512,
                   decoder_sequence_length=64):
    """`T5Seq2SeqLM.from_preset(preset)`; raises `ResourceUnavailableError`
    with a clear message when it cannot be downloaded."""
    import keras_hub

    try:
        model = keras_hub.models.T5Seq2SeqLM.from_preset(preset)
    except Exception as e:  # requests/kagglehub/OSError: no single type
        raise ResourceUnavailableError(
            f"Could not load the keras-hub preset {preset!r}: it has to be "
            "downloaded (Kaggle Models / Hugging Face Hub) and that failed, "
            f"most likely for lack of network ({type(e).__name__}: "
            f"{str(e)[:200]}). "
            "Use `--backbone-config tiny` to train a small T5 from scratch "
            "offline, or run with network access."
        ) from e
    model.preprocessor.encoder_sequence_length = encoder_sequence_length
    model.preprocessor.decoder_sequence_length = decoder_sequence_length
    return model


def load_xsum(split, *, limit=None, max_source_words=400):
    """XSUM `(document, summary)` pairs through tensorflow-datasets."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ResourceUnavailableError(
            "The XSUM path needs `tensorflow-datasets` (pip install "
            "tensorflow-datasets) and network access to download XSUM."
        ) from e
    tfds_split = {"val": "validation"}.get(split, split)
    if limit is not None:
        tfds_split = f"{tfds_split}[:{int(limit)}]"
    try:
        ds = tfds.load("xsum", split=tfds_split)
    except Exception as e:
        raise ResourceUnavailableError(
            f"Could not download/prepare XSUM with tensorflow-datasets "
            f"({type(e).__name__}: {str(e)[:200]})."
        ) from e
    pairs = []
    for ex in tfds.as_numpy(ds):
        doc = ex["document"].decode("utf-8")
        pairs.append((truncate_sentences([doc], max_source_words),
                      ex["summary"].decode("utf-8")))
    return pairs
