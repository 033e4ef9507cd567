"""The seed's PyTorch model and recipe: the reference of the parity tests, tools.compare_torch
and tools.bench.

This is the notebook's ModifiedResNet (a half-width ResNet-18 of BasicBlocks), with the
state_dict keys of the seed's checkpoints (conv1.weight, layer2.0.shortcut.0.weight, ...),
its optimizer, scheduler, train step and evaluation, and the numbers it published.
Inputs are NCHW tensors of the model's dtype (jaxres batches are NHWC: `nchw` converts).
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_planes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(
          nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
          nn.BatchNorm2d(planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    out += self.shortcut(x)
    return F.relu(out)


class ModifiedResNet(nn.Module):
  """conv3x3 -> BN -> ReLU, 4 stages of BasicBlocks, avg_pool2d(4), Linear."""

  def __init__(self, num_blocks=(2, 2, 2, 2), widths=(32, 64, 128, 256), num_classes=10):
    super().__init__()
    self.in_planes = widths[0]
    self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    self.layer1 = self._make_layer(widths[0], num_blocks[0], stride=1)
    self.layer2 = self._make_layer(widths[1], num_blocks[1], stride=2)
    self.layer3 = self._make_layer(widths[2], num_blocks[2], stride=2)
    self.layer4 = self._make_layer(widths[3], num_blocks[3], stride=2)
    self.linear = nn.Linear(widths[3], num_classes)

  def _make_layer(self, planes, num_blocks, stride):
    layers = []
    for s in [stride] + [1] * (num_blocks - 1):
      layers.append(BasicBlock(self.in_planes, planes, s))
      self.in_planes = planes
    return nn.Sequential(*layers)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
    out = F.avg_pool2d(out, 4)
    return self.linear(out.view(out.size(0), -1))


def seed_optimizer(model, lr=1e-3, weight_decay=1e-4, betas=(0.9, 0.999), eps=1e-8):
  """torch.optim.Adam(lr=1e-3, weight_decay=1e-4), as the seed (coupled L2 decay)."""
  return torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps,
                          weight_decay=weight_decay)


def seed_scheduler(optimizer):
  """ReduceLROnPlateau(mode='min', factor=0.1, patience=5), stepped on the test loss."""
  return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode='min', factor=0.1, patience=5)


# The seed's published numbers (its notebook's log, official CIFAR-10): only these epochs.
PUBLISHED = {
    29: {'test_accuracy': 0.8782},
    30: {'test_accuracy': 0.9105},  # after the learning-rate drop
    40: {'train_loss': 0.1905, 'train_accuracy': 0.9330, 'test_loss': 0.2672,
         'test_accuracy': 0.9148},
}


def nchw(images_nhwc, dtype=torch.float32) -> torch.Tensor:
  """An NCHW tensor of NHWC images (a jaxres batch)."""
  images = np.ascontiguousarray(np.asarray(images_nhwc).transpose(0, 3, 1, 2))
  return torch.from_numpy(images).to(dtype)


def _dtype(model) -> torch.dtype:
  return next(model.parameters()).dtype


def train_step(model, optimizer, images_nhwc, labels, label_smoothing=0.0) -> float:
  """The seed's inner loop on one batch: forward in train mode, backward, step; the loss."""
  model.train()
  optimizer.zero_grad()
  outputs = model(nchw(images_nhwc, _dtype(model)))
  loss = F.cross_entropy(outputs, torch.as_tensor(np.asarray(labels), dtype=torch.long),
                         label_smoothing=label_smoothing)
  loss.backward()
  optimizer.step()
  return loss.item()


@torch.no_grad()
def predict(model, images_nhwc, batch_size=100) -> torch.Tensor:
  """Logits of `images` in eval mode (running statistics), batch by batch as the seed."""
  model.eval()
  return torch.cat([model(nchw(images_nhwc[start:start + batch_size], _dtype(model)))
                    for start in range(0, len(images_nhwc), batch_size)])


def evaluate(model, images_nhwc, labels, batch_size=100) -> dict:
  """The seed's test loop: eval mode, mean cross-entropy and accuracy over all images."""
  logits = predict(model, images_nhwc, batch_size)
  labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
  return {'test_loss': float(F.cross_entropy(logits, labels, reduction='sum')) / len(labels),
          'test_accuracy': int((logits.argmax(1) == labels).sum()) / len(labels)}
