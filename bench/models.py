"""Whole models for the CPU benchmarks (torch): the drop-in use, cnnfast's convolutions inside torch's layers."""
import torch
from torch import nn


def _inverted_residual(cin, cout, stride, expand):
    hidden = cin * expand
    layers = [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()] if expand != 1 else []
    layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
               nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers)


def mobilenetv2(classes=1000):
    """MobileNetV2 (Sandler et al. 2018; torchvision's layers, without the residual adds): 52 convolutions, 17 of
    them depthwise, on 224x224 images; the same weights on every call."""
    torch.manual_seed(0)
    layers, cin = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()], 32
    for expand, cout, repeats, stride in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                                          (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(repeats):
            layers.append(_inverted_residual(cin, cout, stride if i == 0 else 1, expand))
            cin = cout
    layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(), nn.AdaptiveAvgPool2d(1),
               nn.Flatten(), nn.Linear(1280, classes)]
    return nn.Sequential(*layers).eval()
