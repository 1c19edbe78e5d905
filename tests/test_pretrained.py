"""PyTorch CIFAR ResNet import (the pytorch-classification layout)."""

import jax.numpy as jnp
import numpy as np
import pytest

from bsq_jax import bitplanes as bp
from bsq_jax import pretrained
from bsq_jax import scheme as sch


def torch_resnet(depth, num_classes):
  """pytorch-classification's CIFAR ResNet (BasicBlock, 1x1 downsample)."""
  torch = pytest.importorskip("torch")
  nn = torch.nn

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.downsample = None
      if stride != 1 or cin != cout:
        self.downsample = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

  class ResNet(nn.Module):
    def __init__(self):
      super().__init__()
      k = (depth - 2) // 6
      self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
      self.bn1 = nn.BatchNorm2d(16)
      cin = 16
      for s, cout in enumerate([16, 32, 64]):
        blocks = []
        for b in range(k):
          blocks.append(Block(cin, cout, 2 if (s > 0 and b == 0) else 1))
          cin = cout
        setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
      self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
      x = torch.relu(self.bn1(self.conv1(x)))
      x = self.layer3(self.layer2(self.layer1(x)))
      return self.fc(x.mean((2, 3)))

  torch.manual_seed(0)
  net = ResNet()
  # Non-trivial BatchNorm statistics, as a trained network has.
  for m in net.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.running_mean.uniform_(-0.5, 0.5)
      m.running_var.uniform_(0.5, 2.0)
      m.weight.data.uniform_(0.5, 1.5)
      m.bias.data.uniform_(-0.2, 0.2)
  return torch, net.eval()


def state_dict_numpy(net):
  return {k: v.detach().numpy() for k, v in net.state_dict().items()}


def test_float_resnet20_reproduces_pytorch_logits():
  torch, net = torch_resnet(20, 10)
  x = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
  want = net(torch.from_numpy(x)).detach().numpy()
  model, variables = pretrained.load_torch_resnet(
      state_dict_numpy(net), depth=20, num_classes=10, act_bits=32)
  got = model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), train=False)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_eight_bit_import_is_close_to_float():
  torch, net = torch_resnet(8, 10)
  sd = state_dict_numpy(net)
  model, variables = pretrained.load_torch_resnet(sd, 8, 10, 32, weight_bits=8)
  assert sch.scheme_of(variables["params"]) and set(
      sch.scheme_of(variables["params"]).values()) == {8}
  assert isinstance(variables["params"]["conv1"]["kernel"], bp.BitPlanes)
  x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
  want = net(torch.from_numpy(x)).detach().numpy()
  got = model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert np.max(np.abs(np.asarray(got) - want)) < 0.05 * np.abs(want).max()


def synthetic_state_dict(depth=8):
  """A state_dict with the right names and shapes, no torch needed."""
  from bsq_jax.models.cifar_resnet import CifarResNet
  import jax
  model = CifarResNet(depth=depth)  # plain Flax: float ReLUs, no PACT
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, 32, 32, 3))))
  sd = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    name = pretrained.cifar_torch_name(tuple(k.key for k in path[1:]))
    shape = leaf.shape
    if len(shape) == 4:
      shape = (shape[3], shape[2], shape[0], shape[1])
    elif len(shape) == 2:
      shape = shape[::-1]
    sd[name] = np.ones(shape, np.float32)
  return sd


def test_missing_key_is_named():
  sd = synthetic_state_dict()
  del sd["layer2.0.downsample.0.weight"]
  with pytest.raises(ValueError, match="missing key 'layer2.0.downsample.0.weight'"):
    pretrained.load_torch_resnet(sd, 8, 10, 4)


def test_misshapen_key_is_named():
  sd = synthetic_state_dict()
  sd["fc.weight"] = np.ones((10, 32), np.float32)
  with pytest.raises(ValueError, match="'fc.weight' has shape"):
    pretrained.load_torch_resnet(sd, 8, 10, 4)


def test_unexpected_key_is_named():
  sd = synthetic_state_dict()
  sd["layer4.0.conv1.weight"] = np.ones((3,), np.float32)
  with pytest.raises(ValueError, match="unexpected keys"):
    pretrained.load_torch_resnet(sd, 8, 10, 4)


def test_read_checkpoint_roundtrip(tmp_path):
  torch, net = torch_resnet(8, 10)
  path = tmp_path / "model.pth"
  torch.save({"state_dict": {"module." + k: v for k, v in
                             net.state_dict().items()}}, path)
  sd = pretrained.read_torch_checkpoint(str(path))
  assert "conv1.weight" in sd and isinstance(sd["conv1.weight"], np.ndarray)
  pretrained.load_torch_resnet(sd, 8, 10, 32)
