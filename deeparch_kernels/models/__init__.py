"""Builders mirroring torchvision.models' (``weights=``, ``progress=``, ``**kwargs``) plus
``backend=``: the same architectures and state_dict keys, running the fused kernels.

  vgg11 vgg13 vgg16 vgg19, vgg11_bn ... vgg19_bn       (vgg.py)
  resnet18 resnet34 resnet50 resnet101 resnet152       (resnet.py)

``weights`` takes a torchvision weights enum (downloaded through its get_state_dict), a
state_dict, or a path to a saved state_dict (see _weights.py).

The ResNet paper's CIFAR-style nets, which torchvision does not have (cifar.py; no weights=,
kept out of BUILDERS, the torchvision-mirroring list that verify and the benchmarks walk):

  cifar_resnet(depth, plain=..., shortcut="A"|"B", ...), resnet20 ... resnet110, plain20 ... plain110
"""
from .cifar import (CifarResNet, cifar_resnet, plain20, plain32, plain44, plain56, plain110,
                    resnet20, resnet32, resnet44, resnet56, resnet110)
from .resnet import FusedResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from .vgg import make_layers, vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19, vgg19_bn

BUILDERS = {
    f.__name__: f
    for f in (vgg11, vgg13, vgg16, vgg19, vgg11_bn, vgg13_bn, vgg16_bn, vgg19_bn,
              resnet18, resnet34, resnet50, resnet101, resnet152)
}

CIFAR_BUILDERS = {
    f.__name__: f
    for f in (resnet20, resnet32, resnet44, resnet56, resnet110,
              plain20, plain32, plain44, plain56, plain110)
}

__all__ = ["BUILDERS", "CIFAR_BUILDERS", "CifarResNet", "FusedResNet", "cifar_resnet", "make_layers",
           *BUILDERS, *CIFAR_BUILDERS]
