"""The built-in methods. A new method: one module here declaring ``METHOD``, one line below."""

from ..registry import register_method
from . import magnitude, sparsegpt, thanos, wanda

for _module in (magnitude, wanda, sparsegpt, thanos):
    register_method(_module.METHOD)
