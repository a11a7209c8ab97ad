"""Curvature blocks: one structure of curvature per variable, one interface.

As kfac-jax lays out its curvature blocks, every trainable variable gets one
block that owns its curvature state, refreshes it from the Fisher gradient
d, and turns the momentum into the variable's new value:

* `IdentityBlock`: no curvature (Adam's step in its metric, or the paper's
  m̂/γ): variables excluded from curvature;
* `VectorBlock`: the paper's block (`keras_ginger.curvature`): a rank-τ
  eigendecomposition of the curvature of the flattened variable, Woodbury
  step;
* `KroneckerBlock` (`keras_ginger.kronecker`): rank-k eigendecompositions
  of the two Kronecker factors of a matrix-shaped variable, step
  L̃^{-p} M̂ R̃^{-p}.

The interface (`CurvatureBlock`): ``build`` creates the state variables;
``state()`` reads them; a refresh runs in two halves around the
eigensolves of all blocks of an update (`eigh_each`), ``begin_refresh``
(the small symmetric matrices to decompose, each tagged with how) and
``end_refresh`` (the new state and θ'); ``reuse`` steps with the state as
it is (`curvature_interval`). The state is returned, never assigned here,
so that the optimizer can choose between the two paths with one `cond`.

The Keras optimizer (`keras_ginger.optimizer.Ginger`) owns the momentum,
Adam's second moment, the scale rules (grafting) and the hand-over of d;
a block reads them from the `_Entry` the optimizer prepares.

One file per block: `base` (the interface, `IdentityBlock`, the shared
eigensolve `eigh_each`), `vector`, `kronecker`; each block's float64
reference is in tests/reference.py (`DenseGinger`, `DenseKronecker`).
"""

from keras_ginger.blocks.base import ALL
from keras_ginger.blocks.base import TOP
from keras_ginger.blocks.base import CurvatureBlock
from keras_ginger.blocks.base import IdentityBlock
from keras_ginger.blocks.base import eigh_each
from keras_ginger.blocks.kronecker import KroneckerBlock
from keras_ginger.blocks.vector import BLOCK_MIN_BYTES
from keras_ginger.blocks.vector import BLOCK_ROWS
from keras_ginger.blocks.vector import VectorBlock

__all__ = ["ALL", "TOP", "BLOCK_MIN_BYTES", "BLOCK_ROWS", "CurvatureBlock",
           "IdentityBlock", "KroneckerBlock", "VectorBlock", "eigh_each"]
