"""``weights=`` for the builders, as torchvision takes it, plus local state_dicts.

  None                      no weights (the architecture's own random initialisation)
  a torchvision WeightsEnum member of the builder's enum (e.g. ResNet18_Weights.IMAGENET1K_V1),
  or its name ("IMAGENET1K_V1", "DEFAULT")
                            loaded with ``weights.get_state_dict(progress=..., check_hash=True)``
                            (downloads into the torch hub cache), num_classes taken from its meta
  a state_dict (Mapping)    loaded as is
  a path (str / PathLike)   a file saved with ``torch.save(model.state_dict(), path)``, loaded with
                            ``torch.load(path, map_location="cpu", weights_only=True)``

torchvision's deprecated ``pretrained=True`` (the lesson's ``models.vgg16(pretrained=True)``) is
taken too: the IMAGENET1K_V1 weights, with a warning.

The fused models have torchvision's state_dict keys, so every loading is ``load_state_dict``
with ``strict=True``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Type, Union

import torch
from torch import nn
from torchvision.models import WeightsEnum

WeightsArg = Union[None, WeightsEnum, str, "os.PathLike[str]", Mapping[str, Any]]


def resolve(weights: WeightsArg, enum_cls: Type[WeightsEnum]) -> Union[None, WeightsEnum, Path, Mapping]:
    """The weights argument as an enum member of ``enum_cls``, a Path or a state_dict."""
    if weights is None:
        return None
    if isinstance(weights, WeightsEnum):
        return enum_cls.verify(weights)  # ValueError for another model's weights, as torchvision
    if isinstance(weights, str) and weights.replace(f"{enum_cls.__name__}.", "") in enum_cls.__members__:
        return enum_cls.verify(weights)
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights={str(weights)!r} is neither a {enum_cls.__name__} name "
                                    f"({', '.join(enum_cls.__members__)}) nor a file")
        return path
    if isinstance(weights, Mapping):
        return weights
    raise TypeError(f"weights must be None, a {enum_cls.__name__}, a state_dict or a path; "
                    f"got {type(weights).__name__}")


def legacy_pretrained(kwargs: Dict[str, Any], weights: WeightsArg,
                      enum_cls: Type[WeightsEnum]) -> WeightsArg:
    """torchvision's legacy ``pretrained=True`` (as in ``models.vgg16(pretrained=True)``): the
    IMAGENET1K_V1 weights, with torchvision's deprecation warning; ``pretrained=False``: none."""
    if "pretrained" not in kwargs:
        return weights
    pretrained = kwargs.pop("pretrained")
    if weights is not None:
        raise ValueError("pass weights= or the deprecated pretrained=, not both")
    if pretrained:
        warnings.warn(f"'pretrained' is deprecated (as in torchvision): use "
                      f"weights={enum_cls.__name__}.IMAGENET1K_V1", UserWarning, stacklevel=4)
        return enum_cls.IMAGENET1K_V1
    return None


def set_num_classes(kwargs: Dict[str, Any], weights: Union[None, WeightsEnum, Path, Mapping]) -> None:
    """Enum weights fix num_classes to their categories (a different explicit value is an error,
    as in torchvision)."""
    if not isinstance(weights, WeightsEnum) or weights.meta.get("categories") is None:
        return
    n = len(weights.meta["categories"])
    if kwargs.get("num_classes", n) != n:
        raise ValueError(f"num_classes={kwargs['num_classes']} does not match {weights}, which has "
                         f"{n} classes")
    kwargs["num_classes"] = n


def state_dict_of(weights: Union[WeightsEnum, Path, Mapping], progress: bool) -> Mapping[str, Any]:
    if isinstance(weights, WeightsEnum):
        return weights.get_state_dict(progress=progress, check_hash=True)
    if isinstance(weights, Path):
        sd = torch.load(weights, map_location="cpu", weights_only=True)
        if not isinstance(sd, Mapping):
            raise TypeError(f"{weights} holds a {type(sd).__name__}, not a state_dict")
        return sd
    return weights


def load(model: nn.Module, weights: Union[None, WeightsEnum, Path, Mapping], progress: bool) -> nn.Module:
    """Load resolved ``weights`` into ``model`` (strict); returns model."""
    if weights is not None:
        model.load_state_dict(state_dict_of(weights, progress))
    return model
