"""The seed's PyTorch model and recipe: the reference of the parity tests, tools.compare_torch
and tools.bench.

This is the notebook's ModifiedResNet (a half-width ResNet-18 of BasicBlocks), with the
state_dict keys of the seed's checkpoints (conv1.weight, layer2.0.shortcut.0.weight, ...),
its optimizer, scheduler, train step, training and test loops, a dataset of uint8 images
through torchvision transforms, and the numbers it published.
Inputs are NCHW tensors of the model's dtype (jaxres batches are NHWC: `nchw` converts).
"""

import numpy as np
from PIL import Image
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data


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


def seed_scheduler(optimizer, factor=0.1, patience=5, threshold=1e-4, cooldown=0):
  """ReduceLROnPlateau(mode='min', factor=0.1, patience=5) (the defaults are the seed's),
  stepped on the test loss once per epoch."""
  return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode='min', factor=factor,
                                                    patience=patience, threshold=threshold,
                                                    cooldown=cooldown)


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


class ImageDataset(torch.utils.data.Dataset):
  """uint8 NHWC images and their labels through a torchvision transform, as torchvision's
  datasets serve them (a PIL image per item)."""

  def __init__(self, images, labels, transform):
    self.images, self.labels, self.transform = images, labels, transform

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def _optimizer_step(model, optimizer, inputs, targets, label_smoothing):
  """Forward (in the model's current mode), backward, step: (outputs, loss)."""
  optimizer.zero_grad()
  outputs = model(inputs)
  loss = F.cross_entropy(outputs, targets, label_smoothing=label_smoothing)
  loss.backward()
  optimizer.step()
  return outputs, loss


def train_step(model, optimizer, images_nhwc, labels, label_smoothing=0.0) -> float:
  """The seed's inner loop on one batch: forward in train mode, backward, step; the loss."""
  model.train()
  _, loss = _optimizer_step(model, optimizer, nchw(images_nhwc, _dtype(model)),
                            torch.as_tensor(np.asarray(labels), dtype=torch.long),
                            label_smoothing)
  return loss.item()


def _add(sums: dict, outputs, loss_sum, targets) -> None:
  sums['loss_sum'] += float(loss_sum)
  sums['correct'] += int((outputs.argmax(1) == targets).sum())
  sums['count'] += len(targets)


def train_epoch(model, optimizer, batches, label_smoothing=0.0) -> dict:
  """The seed's training loop over (NCHW images, labels) batches, on the model's device.

  Returns the sums {'loss_sum', 'correct', 'count'} over the examples (the loss of each
  batch times its size), as jaxres's trainer keeps them.
  """
  model.train()
  device = next(model.parameters()).device
  sums = {'loss_sum': 0.0, 'correct': 0, 'count': 0}
  for inputs, targets in batches:
    inputs, targets = inputs.to(device), targets.to(device)
    outputs, loss = _optimizer_step(model, optimizer, inputs, targets, label_smoothing)
    _add(sums, outputs, loss.item() * len(targets), targets)
  return sums


@torch.no_grad()
def predict(model, images_nhwc, batch_size=100) -> torch.Tensor:
  """Logits of `images` in eval mode (running statistics), batch by batch as the seed."""
  model.eval()
  return torch.cat([model(nchw(images_nhwc[start:start + batch_size], _dtype(model)))
                    for start in range(0, len(images_nhwc), batch_size)])


@torch.no_grad()
def evaluate(model, batches) -> dict:
  """The seed's test loop over (NCHW images, labels) batches, in eval mode, on the model's
  device: the sums {'loss_sum', 'correct', 'count'} of cross-entropy and correct answers."""
  model.eval()
  device = next(model.parameters()).device
  sums = {'loss_sum': 0.0, 'correct': 0, 'count': 0}
  for inputs, targets in batches:
    inputs, targets = inputs.to(device), targets.to(device)
    outputs = model(inputs)
    _add(sums, outputs, F.cross_entropy(outputs, targets, reduction='sum'), targets)
  return sums
