"""BSQ in your own training loop: plain Flax, optax and numpy, with bsq_jax's
public API. A small CNN on Fashion-MNIST (28x28, read from the IDX files):
one float epoch, BSQ epochs with a host pass after each, one finetuning
epoch, then export and load.

    apt-get install -y dataset-fashion-mnist && python examples/own_loop.py
"""
import gzip
import os

import flax.linen as nn
import jax
import numpy as np
import optax

import bsq_jax as bsq

DATA = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
IMAGES = int(os.environ.get("OWN_LOOP_IMAGES", "12000"))  # training images
OUT = os.environ.get("OWN_LOOP_OUT", "own_loop.bsq")          # the packed file
ALPHA, BSQ_EPOCHS, BATCH = 0.5, 3, 128


def read(name, offset, shape):
  with gzip.open(os.path.join(DATA, name)) as f:
    return np.frombuffer(f.read(), np.uint8, offset=offset).reshape(shape)


x_train = read("train-images-idx3-ubyte.gz", 16, (-1, 28, 28, 1))[:IMAGES] / 255.
y_train = read("train-labels-idx1-ubyte.gz", 8, (-1,))[:IMAGES].astype(np.int32)
x_test = read("t10k-images-idx3-ubyte.gz", 16, (-1, 28, 28, 1)) / 255.
y_test = read("t10k-labels-idx1-ubyte.gz", 8, (-1,)).astype(np.int32)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    for features in (16, 32):
      x = nn.avg_pool(nn.relu(nn.Conv(features, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.relu(nn.Dense(128)(x.reshape((len(x), -1))))
    return nn.Dense(10)(x)


def make_step(model, tx, clip):
  """One jitted SGD step; it compiles again only when the planes' shapes
  change (after a host pass)."""
  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (bsq.project(params) if clip else params), opt_state, loss
  return step


def train_epoch(step, params, opt_state, epoch):
  order = np.random.default_rng(epoch).permutation(len(y_train))
  for i in range(0, len(order) - BATCH + 1, BATCH):
    ids = order[i:i + BATCH]
    params, opt_state, loss = step(params, opt_state, x_train[ids], y_train[ids])
  return params, opt_state, float(loss)


def accuracy(model, variables):
  logits = jax.jit(model.apply)(variables, x_test)
  return float(np.mean(np.argmax(logits, -1) == y_test))


sgd = lambda lr: optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(lr, 0.9))
float_tx = sgd(0.05)
float_params = CNN().init(jax.random.key(0), x_train[:1])["params"]
float_params, _, loss = train_epoch(make_step(CNN(), float_tx, False), float_params,
                                    float_tx.init(float_params), 0)
print(f"float: loss {loss:.3f}, test accuracy {accuracy(CNN(), {'params': float_params}):.2%}")

model = bsq.quantize_model(CNN(), bsq.Rules())          # every kernel, 8-bit planes
params = model.encode(float_params, x_train[:1])
tx = optax.chain(bsq.bit_lasso(ALPHA, bsq.account(params).total_params), sgd(0.05))
opt_state, step = tx.init(params), make_step(model, tx, True)
for epoch in range(BSQ_EPOCHS):
  params, opt_state, loss = train_epoch(step, params, opt_state, epoch + 1)
  params, opt_state, scheme = bsq.host_pass(params, tx, opt_state)
  print(f"bsq epoch {epoch + 1}: loss {loss:.3f}, {bsq.account(params).average_bits:.2f} "
        f"bits, test accuracy {accuracy(model, {'params': params}):.2%}, {scheme}")

ft_params, scheme = bsq.to_finetune(params)
ft_model, ft_tx = model.finetune(scheme), sgd(0.005)
ft_params, _, loss = train_epoch(make_step(ft_model, ft_tx, True), ft_params,
                                 ft_tx.init(ft_params), BSQ_EPOCHS + 1)
acc = bsq.account(ft_params, scheme)
print(f"finetuned: {acc.average_bits:.2f} bits ({acc.compression:.1f}x), "
      f"test accuracy {accuracy(ft_model, {'params': ft_params}):.2%}")

print(bsq.save(OUT, ft_model, {"params": ft_params}, x_test[:1]).summary())
loaded, variables = bsq.load(OUT)
same = np.array_equal(loaded.apply(variables, x_test[:256]),
                      ft_model.apply({"params": ft_params}, x_test[:256]))
print(f"loaded: logits {'identical' if same else 'DIFFERENT'}")
