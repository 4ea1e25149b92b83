"""Model families and model loading."""

from .adapters import ADAPTERS, Adapter, adapter_for

__all__ = ["ADAPTERS", "Adapter", "adapter_for"]
