"""Model families, one module each; importing this package imports every module in it, which registers its
variants. A new family is registered by adding its file here."""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")
