"""Offline tests for the T5/ACLSum example utilities (examples/t5_data.py).

Run per backend, each in its own process:
    KERAS_BACKEND=jax .venv/bin/python -m pytest -q tests/test_t5.py
"""

import os
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("keras_hub")
pytest.importorskip("sentencepiece")
pytest.importorskip("aclsum")
pytest.importorskip("tensorflow_text")  # keras-hub's SentencePiece tokenizer

import keras  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import t5_data as td  # noqa: E402

pytestmark = [
    # keras-hub T5 quirks, harmless here: the embedding's Keras mask reaches
    # T5MultiHeadAttention (which uses explicit padding masks instead), and
    # fit() on strings builds a tf.data pipeline, so `shuffle` is ignored.
    pytest.mark.filterwarnings("ignore:Layer .* was passed an input with a mask"),
    pytest.mark.filterwarnings("ignore:`shuffle=True` was passed"),
]

ENC_LEN, DEC_LEN = 48, 16
VOCAB = 256

# Short pairs so that the packed batch has real padding on both sides.
SHORT_PAIRS = [
    ("We study parsing.", "Parsing improves."),
    ("A new model for translation of short texts is proposed here.",
     "The model translates better than the baseline on short texts."),
]


@pytest.fixture(scope="module")
def train_pairs():
    return td.load_aclsum("train", max_source_words=128, limit=16)


@pytest.fixture(scope="module")
def proto(train_pairs):
    texts = [t for pair in train_pairs for t in pair]
    return td.train_sentencepiece(texts, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def adam_model(proto):
    """One compiled tiny T5 shared by the tests that do not depend on its
    weights (building it is the slow part under JAX)."""
    return td.compile_t5(_model(proto), keras.optimizers.Adam(1e-3))


def _model(proto, dropout=0.0):
    return td.build_tiny_t5(
        proto,
        encoder_sequence_length=ENC_LEN,
        decoder_sequence_length=DEC_LEN,
        seed=0,
        dropout=dropout,
    )


def _weights(model):
    return [keras.ops.convert_to_numpy(w).copy() for w in model.trainable_weights]


# ----------------------------------------------------------------- ACLSum
@pytest.mark.parametrize(
    "split,size", [("train", 100), ("val", 50), ("validation", 50), ("test", 100)]
)
def test_aclsum_split_sizes_and_texts(split, size):
    pairs = td.load_aclsum(split, max_source_words=64)
    assert len(pairs) == size == td.SPLIT_SIZES[td._canonical_split(split)]
    for src, tgt in pairs:
        assert isinstance(src, str) and src.strip()
        assert isinstance(tgt, str) and tgt.strip()
        assert len(src.split()) <= 64


@pytest.mark.parametrize("aspect", td.ASPECTS)
def test_aclsum_aspects_differ(aspect):
    pairs = td.load_aclsum("val", aspect=aspect, limit=3)
    assert len(pairs) == 3 and all(t for _, t in pairs)
    other = [a for a in td.ASPECTS if a != aspect][0]
    assert [t for _, t in pairs] != [
        t for _, t in td.load_aclsum("val", aspect=other, limit=3)
    ]


def test_aclsum_rejects_bad_arguments():
    with pytest.raises(ValueError):
        td.load_aclsum("dev2")
    with pytest.raises(ValueError):
        td.load_aclsum("train", aspect="method")


def test_truncate_sentences_keeps_whole_sentences():
    sents = ["a b c.", "d e f g.", "h i."]
    assert td.truncate_sentences(sents, 7) == "a b c. d e f g."
    assert td.truncate_sentences(sents, 5) == "a b c."
    assert td.truncate_sentences(sents, 2) == "a b"  # first sentence cut
    assert td.truncate_sentences(sents, None) == "a b c. d e f g. h i."


# ----------------------------------------------------------- SentencePiece
def test_sentencepiece_t5_special_ids(proto, tmp_path, train_pairs):
    import keras_hub

    assert isinstance(proto, bytes) and proto
    tok = keras_hub.models.T5Tokenizer(proto=proto)
    assert 3 < tok.vocabulary_size() <= VOCAB
    assert tok.pad_token_id == 0 and tok.id_to_token(0) == "<pad>"
    assert tok.end_token_id == 1 and tok.id_to_token(1) == "</s>"
    assert tok.id_to_token(2) == "<unk>"
    ids = keras.ops.convert_to_numpy(tok("the model improves results"))
    assert ids.ndim == 1 and ids.size > 0 and ids.min() >= 3
    # model_prefix_dir also writes the proto to disk.
    texts = [t for pair in train_pairs[:4] for t in pair]
    p2 = td.train_sentencepiece(texts, vocab_size=100, model_prefix_dir=tmp_path)
    assert (tmp_path / "spm.model").read_bytes() == p2


# -------------------------------------------------------------- tiny T5
def test_build_tiny_t5(adam_model):
    import keras_hub

    model = adam_model
    assert isinstance(model, keras_hub.models.T5Seq2SeqLM)
    bb = model.backbone
    assert isinstance(bb, keras_hub.models.T5Backbone)
    assert (bb.num_layers, bb.num_heads, bb.hidden_dim) == (2, 4, 64)
    assert bb.intermediate_dim == 128
    assert bb.vocabulary_size == model.preprocessor.tokenizer.vocabulary_size()
    assert model.count_params() < 250_000
    x, y, sw = td.preprocess_pairs(model.preprocessor, SHORT_PAIRS)
    assert x["encoder_token_ids"].shape == (2, ENC_LEN)
    assert x["decoder_token_ids"].shape == y.shape == sw.shape == (2, DEC_LEN)
    logits = model(x)
    assert tuple(logits.shape) == (2, DEC_LEN, bb.vocabulary_size)


def test_padding_is_masked_out_of_the_loss(adam_model):
    model = adam_model
    x, y, sw = td.preprocess_pairs(model.preprocessor, SHORT_PAIRS)
    # Decoder input is "<pad> tokens </s>" shifted; labels are "tokens </s>".
    assert (x["decoder_token_ids"][:, 0] == 0).all()
    n_real = sw.sum(axis=1).astype(int)
    assert 0 < n_real.min() and n_real.max() <= DEC_LEN and sw.min() == 0
    for row, n in zip(range(len(y)), n_real):
        assert y[row, n - 1] == 1  # </s> is the last weighted label
        assert (sw[row, :n] == 1).all() and (sw[row, n:] == 0).all()
        assert (y[row, n:] == 0).all()

    logits = model(x)
    loss = float(keras.ops.convert_to_numpy(
        model.compute_loss(x=x, y=y, y_pred=logits, sample_weight=sw)))
    logp = keras.ops.convert_to_numpy(keras.ops.log_softmax(logits, axis=-1))
    nll = -np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(loss, (nll * sw).sum() / sw.sum(), rtol=1e-5)
    # Whatever sits in the padded label positions does not matter.
    y_junk = np.where(sw > 0, y, 7)
    loss_junk = float(keras.ops.convert_to_numpy(
        model.compute_loss(x=x, y=y_junk, y_pred=logits, sample_weight=sw)))
    np.testing.assert_allclose(loss_junk, loss, rtol=1e-6)


def test_generate_and_rouge(adam_model):
    model = adam_model
    preds = td.generate_summaries(model, [s for s, _ in SHORT_PAIRS],
                                  batch_size=2, max_length=8)
    assert len(preds) == 2 and all(isinstance(p, str) for p in preds)
    refs = [t for _, t in SHORT_PAIRS]
    scores = td.rouge_scores(preds, refs)
    assert set(scores) == {"rouge1", "rouge2", "rougeL"}
    assert all(0.0 <= v <= 100.0 for v in scores.values())
    assert td.rouge_scores(refs, refs)["rougeL"] == pytest.approx(100.0)


def test_adam_train_step_and_fit_on_strings(adam_model, train_pairs):
    # Runs after the tests above: it changes the shared model's weights.
    model = adam_model
    before = _weights(model)
    # With a preprocessor attached, train_on_batch/fit take *raw strings*
    # (keras-hub's PipelineModel preprocesses them; token ids would fail).
    out = model.train_on_batch(td.to_features(train_pairs[:2]),
                               return_dict=True)
    assert np.isfinite(out["loss"])
    after = _weights(model)
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
    # The example's path: fit() on the string dict.
    hist = model.fit(td.to_features(train_pairs[:4]), batch_size=2, epochs=1,
                     verbose=0)
    assert np.isfinite(hist.history["loss"][-1])


def _ginger():
    import keras_ginger

    return keras_ginger


def test_ginger_fisher_train_step_fit_and_loss_decreases(proto, train_pairs):
    """with_fisher + Ginger: one train_on_batch, then the example's fit()
    path, whose loss falls.

    One layer instead of two keeps the (per-variable) Ginger step cheap to
    compile; fit() uses the same batch shape, so JAX does not retrace.
    """
    ginger = _ginger()
    keras.utils.set_random_seed(0)
    model = td.build_tiny_t5(proto, encoder_sequence_length=ENC_LEN,
                             decoder_sequence_length=DEC_LEN, seed=0,
                             dropout=0.0, num_layers=1)
    model = ginger.with_fisher(model)
    # A large (Adam-scale) learning rate, so that 8 passes over 4 examples
    # show a clear decrease.
    td.compile_t5(model, ginger.Ginger(learning_rate=3e-2, tau=8))
    feats = td.to_features(train_pairs[:4])
    before = _weights(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.train_on_batch(feats, return_dict=True)
    # The sampled-label Fisher reached Ginger (no empirical-Fisher fallback).
    assert not [w for w in caught if "empirical Fisher" in str(w.message)]
    assert np.isfinite(out["loss"])
    after = _weights(model)
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
    assert all(np.isfinite(a).all() for a in after)
    # fit() on a tf.data pipeline: the batch dimension is unknown while the
    # train step is traced (TF), unlike in train_on_batch.
    # (Regression guard: Ginger once rejected the (None, ...) static shapes
    # of TF's traced gradients here.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hist = model.fit(feats, batch_size=4, epochs=8, verbose=0)
    losses = hist.history["loss"]
    assert np.all(np.isfinite(losses))
    assert all(np.isfinite(a).all() for a in _weights(model))
    assert losses[-1] < 0.9 * losses[0], losses


class _LastFisher(keras.optimizers.SGD):
    """SGD that takes fisher_grads and keeps the last d, variable by variable."""

    accepts_fisher_grads = True

    def build(self, var_list):
        super().build(var_list)
        self.last_d = [self.add_variable_from_reference(v, "last_d")
                       for v in var_list]

    def stateless_apply(self, optimizer_variables, grads, trainable_variables,
                        fisher_grads=None):
        self._pending = fisher_grads
        try:
            return super().stateless_apply(optimizer_variables, grads,
                                           trainable_variables)
        finally:
            self._pending = None

    def apply(self, grads, trainable_variables=None, fisher_grads=None):
        fisher_grads = fisher_grads or getattr(self, "_pending", None)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        for slot, d in zip(self.last_d, fisher_grads):
            slot.assign(d)
        super().apply(grads, trainable_variables)


def _t5_fisher_d(proto):
    """(the T5's preprocessor, d_for(x, y, sw) -> d of one train step). One
    model for all calls: lr = 0 keeps the weights, and the step counter is
    reset so that every call samples from the same seeds."""
    from keras_ginger import _keras_compat

    model = td.build_tiny_t5(proto, encoder_sequence_length=ENC_LEN,
                             decoder_sequence_length=DEC_LEN, seed=0,
                             dropout=0.0, num_layers=1)
    preprocessor = model.preprocessor
    model.preprocessor = None  # train on token ids
    _ginger().with_fisher(model, seed=11)
    opt = _LastFisher(learning_rate=0.0, name="last_fisher")
    td.compile_t5(model, opt)

    def d_for(x, y, sw):
        _keras_compat.micro_step(opt).assign(0)
        model.train_on_batch(x, y, sample_weight=sw)
        return [np.array(keras.ops.convert_to_numpy(v)) for v in opt.last_d]

    return preprocessor, d_for


def test_t5_padding_tokens_are_excluded_from_d(proto):
    """Labels at padded positions (sample_weight 0) do not change d; the
    weights do (the control)."""
    preprocessor, d_for = _t5_fisher_d(proto)
    x, y, sw = td.preprocess_pairs(preprocessor, SHORT_PAIRS)
    assert (sw == 0).any() and (sw == 1).any()
    d1 = d_for(x, y, sw)
    assert sum(float(np.abs(a).sum()) for a in d1) > 0
    np.testing.assert_array_equal(d_for(x, y, sw)[0], d1[0])  # same seeds
    y_junk = np.where(sw == 0, (y + 7) % (VOCAB - 3) + 3, y)
    for a, b in zip(d1, d_for(x, y_junk, sw)):
        np.testing.assert_array_equal(a, b)
    sw_fewer = sw.copy()
    sw_fewer[0, :] = 0  # the first summary's tokens no longer count
    d2 = d_for(x, y, sw_fewer)
    assert any(not np.array_equal(a, b) for a, b in zip(d1, d2))


def test_keras_nlp_t5_trains_and_restores_from_weights_file(
        proto, train_pairs, tmp_path):
    """The README's KerasNLP spelling, `keras_nlp.models.T5Seq2SeqLM`, trains
    with `with_fisher` + Ginger (sampled Fisher, no empirical fallback); and
    since KerasHub tasks skip the optimizer on `load_model`, the weights-file
    recipe (`keras_ginger.load_training_state`) restores all of Ginger's
    state (exact resumption from restored state is tested on small models in
    test_checkpoint.py)."""
    keras_nlp = pytest.importorskip("keras_nlp")
    ginger = _ginger()

    def fresh():
        model = td.build_tiny_t5(proto, encoder_sequence_length=ENC_LEN,
                                 decoder_sequence_length=DEC_LEN, seed=0,
                                 dropout=0.0, num_layers=1,
                                 package="keras_nlp")
        assert isinstance(model, keras_nlp.models.T5Seq2SeqLM)
        x, y, sw = td.preprocess_pairs(model.preprocessor, train_pairs[:2])
        model.preprocessor = None  # train on token ids
        ginger.with_fisher(model, seed=5)
        assert isinstance(model, keras_nlp.models.T5Seq2SeqLM)
        assert isinstance(model, ginger.FisherTrainStep)
        td.compile_t5(model, ginger.Ginger(tau=4))
        return model, (x, y, sw)

    model, (x, y, sw) = fresh()
    before = _weights(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hist = model.fit(x, y, sample_weight=sw, batch_size=2, epochs=2,
                         shuffle=False, verbose=0)
    assert not [w for w in caught if "empirical Fisher" in str(w.message)]
    assert np.isfinite(hist.history["loss"]).all()
    assert any(not np.allclose(a, b) for a, b in zip(before, _weights(model)))
    path = str(tmp_path / "t5.weights.h5")
    model.save_weights(path)
    saved = [np.array(keras.ops.convert_to_numpy(v))
             for v in model.optimizer.variables]
    restored, _ = fresh()
    assert ginger.load_training_state(restored, path) is restored
    assert int(restored.optimizer.iterations) == 2
    got = [np.array(keras.ops.convert_to_numpy(v))
           for v in restored.optimizer.variables]
    assert len(got) == len(saved) > 10
    for a, b in zip(got, saved):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_weights(restored), _weights(model)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------ network path (offline)
def test_preset_failure_gives_clear_message(monkeypatch):
    import keras_hub

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setattr(keras_hub.models.T5Seq2SeqLM, "from_preset", offline)
    with pytest.raises(td.ResourceUnavailableError, match="t5_small_multi"):
        td.load_t5_preset("t5_small_multi")
