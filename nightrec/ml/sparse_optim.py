"""RowAdam: Adam that updates only the embedding rows a batch used ("lazy Adam").

Keras 3's ``Adam`` on an ``Embedding`` table updates the whole table every step: the gradient
arrives as a ``tf.IndexedSlices`` (the backprop of ``tf.gather``), but ``update_step``'s
arithmetic (``gradient - m``) densifies it, and ``m``, ``v`` and the table are then rewritten
in full. A step's cost grows with the number of users (mf_softmax's user table) even though a
batch touches at most ``batch_size`` rows.

:class:`RowAdam` takes the sparse branch for a sparse gradient: the slices are summed per row
(``tf.unique`` + ``tf.math.unsorted_segment_sum``), the rows' ``m`` and ``v`` are gathered,
updated as Adam would, and scattered back, and only those rows of the variable move. This is
TF Addons' ``LazyAdam``: bias correction uses the optimizer's global step, so a row used in
every step follows exactly Adam's trajectory, and a row not used in a step keeps its value,
``m`` and ``v`` (Adam would still move it with its decaying momentum). A dense gradient (the
full softmax's item table, the side-feature maps) gets Keras' own Adam update.

Backends: sparse gradients exist only under TensorFlow. Under JAX or PyTorch every gradient is
dense and RowAdam *is* Keras' Adam (dense updates, cost growing with the table).

Not row-wise, hence refused or costly: ``weight_decay`` decays the whole table every step
(refused: a ValueError); ``use_ema`` keeps a dense average of every variable (allowed, costs a
dense pass per step). Gradient clipping and mixed precision's loss scaling keep the slices
sparse.

Importing this module imports Keras (through ``models.keras_module``, which picks the backend).
"""

from __future__ import annotations

from nightrec.ml import models

keras = models.keras_module()


@keras.saving.register_keras_serializable(package="nightrec", name="RowAdam")
class RowAdam(keras.optimizers.Adam):
    """Adam whose update for a sparse (``tf.IndexedSlices``) gradient touches only its rows.

    Same arguments as ``keras.optimizers.Adam`` (``learning_rate`` > 0, ``beta_1``/``beta_2``
    in [0, 1), ``epsilon`` > 0, ``amsgrad``), except ``weight_decay``, which must be None.
    Serialisable (``get_config`` is Adam's; registered as ``nightrec>RowAdam``) and
    checkpointed like Adam (same slot variables: ``momentum``, ``velocity``).
    """

    def __init__(self, learning_rate=0.001, *, weight_decay=None, **kwargs):
        if weight_decay is not None:
            raise ValueError("RowAdam: weight_decay decays the whole table every step; "
                             "put an L2 penalty on the rows a batch uses instead")
        super().__init__(learning_rate=learning_rate, weight_decay=None, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            if isinstance(gradient, tf.IndexedSlices):
                self._update_rows(tf, gradient, variable, learning_rate)
                return
        super().update_step(gradient, variable, learning_rate)

    def _update_rows(self, tf, gradient, variable, learning_rate):
        """Adam on the rows of ``gradient`` only; every other row, and its m and v, is untouched.

        The formulas are Keras Adam's, in the same order, so a row used every step gets the
        same float32 values as under Adam (up to the order of summing duplicate slices)."""
        dtype = variable.dtype
        rows, position = tf.unique(gradient.indices)
        g = tf.math.unsorted_segment_sum(tf.cast(gradient.values, dtype), position,
                                         tf.shape(rows)[0])
        lr = tf.cast(learning_rate, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        alpha = lr * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))

        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        m_rows = tf.gather(_tf_variable(m), rows)
        v_rows = tf.gather(_tf_variable(v), rows)
        m_rows = m_rows + (g - m_rows) * (1 - beta_1)
        v_rows = v_rows + (tf.square(g) - v_rows) * (1 - beta_2)
        self.assign(m, tf.IndexedSlices(m_rows, rows))
        self.assign(v, tf.IndexedSlices(v_rows, rows))
        if self.amsgrad:
            v_hat = self._velocity_hats[index]
            v_rows = tf.maximum(tf.gather(_tf_variable(v_hat), rows), v_rows)
            self.assign(v_hat, tf.IndexedSlices(v_rows, rows))
        step_rows = m_rows * alpha / (tf.sqrt(v_rows) + tf.cast(self.epsilon, dtype))
        self.assign_sub(variable, tf.IndexedSlices(step_rows, rows))


@keras.saving.register_keras_serializable(package="nightrec", name="RowEmbedding")
class RowEmbedding(keras.layers.Embedding):
    """``keras.layers.Embedding`` whose TensorFlow lookup reads only the rows it returns.

    Keras' lookup is ``ops.take(table, ids)``: a dense read of the whole variable, then a
    gather. Once any sparse op (RowAdam's gather/scatter) has touched a TF resource variable,
    TF keeps it in copy-on-read mode, and every dense read copies the whole table: measured
    360 ms per read for 2M x 64 float32 on this machine's CPU, the same O(rows) cost RowAdam
    removes. ``tf.gather`` on the variable itself (``ResourceGather``) reads only ``ids``'
    rows, and its gradient is the same ``tf.IndexedSlices``. Other backends, and LoRA or
    quantized layers, use Keras' lookup.
    """

    def call(self, inputs):
        if (keras.backend.backend() != "tensorflow" or self.lora_enabled
                or self.quantization_mode):
            return super().call(inputs)
        import tensorflow as tf

        if isinstance(inputs, (tf.SparseTensor, tf.RaggedTensor)):
            return super().call(inputs)
        ids = tf.convert_to_tensor(inputs)
        if ids.dtype not in (tf.int32, tf.int64):
            ids = tf.cast(ids, tf.int32)
        rows = tf.gather(_tf_variable(self._embeddings), ids)
        return tf.cast(rows, self.compute_dtype)


def _tf_variable(variable):
    """The ``tf.Variable`` behind a Keras variable (``update_step`` gets the model's variables
    already unwrapped, the optimizer's slots wrapped)."""
    return getattr(variable, "value", variable)
