"""zoo: lightweight CNNs (MobileNet, SqueezeNet, ShuffleNet, ResNet, LeNet) with recipes to train,
distill, prune, quantize and factorize them, and profilers whose counts match the papers."""

from zoo._registry import (Arg, ModelCard, Reference, create, install_weights_loader, list_models, model_args,
                           model_card, register_model)
from zoo.errors import ZooError
from zoo.weights import create_pretrained, list_weights
from zoo.profile import Profile, profile  # note: `zoo.profile` is the function; the module is zoo.profile in sys.modules

__all__ = ["Arg", "ModelCard", "Profile", "Reference", "ZooError", "create", "list_models", "list_weights", "model_args",
           "model_card", "profile", "register_model"]
__version__ = "0.1.0"

# `create(name, weights=...)` delegates to zoo.weights: the registry never imports upward (zoo.weights.loading).
install_weights_loader(create_pretrained)
