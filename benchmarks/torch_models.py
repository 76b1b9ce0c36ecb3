"""PyTorch references of dp_jax's models for the benchmarks (never imported by dp_jax)."""

from __future__ import annotations


def resnet18(torch, *, width: int = 32, num_classes: int = 10):
    """ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool), BasicBlocks of widths
    ``width * (1, 2, 4, 8)``, BatchNorm, 1x1 projection shortcuts: dp_jax's ``resnet18``."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                        nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.short(x))

    layers, cin = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()], width
    for s in range(4):
        cout = width * 2 ** s
        for b in range(2):
            layers.append(Block(cin, cout, 2 if s > 0 and b == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def resnet18_step(torch, *, width: int, batch: int):
    """One masked SGD training step (momentum 0.9, weight decay 5e-4) of :func:`resnet18` on a
    fixed random batch of 32x32x3 images, as a callable (the step dp_jax's trainer takes)."""
    torch.manual_seed(0)
    net = resnet18(torch, width=width)
    weights = [p for n, p in net.named_parameters() if p.dim() >= 2]
    masks = [torch.ones_like(w) for w in weights]
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.arange(batch) % 10
    loss_fn = torch.nn.functional.cross_entropy

    def step():
        with torch.no_grad():
            for w, m in zip(weights, masks):
                w.mul_(m)
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        for w, m in zip(weights, masks):
            w.grad.mul_(m)
        opt.step()
    return step
