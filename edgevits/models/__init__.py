"""Model families, one module each. Every family module defines ``MODEL`` (its classifier class) and ``VARIANTS``
(name -> ``Variant``: config and published figures); ``edgevits.registry`` reads them. A new family is registered
by adding its file here."""
import importlib
import pkgutil

from .base import ClassifierModel, ModelConfig, Variant

FAMILY_MODULES = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)
                  if info.name != "base"]

__all__ = ["FAMILY_MODULES", "ClassifierModel", "ModelConfig", "Variant"]
