"""bitsmith.algorithms: weight algorithms, each registered by its module (:mod:`bitsmith.algorithms.base`).

Importing the package registers every method; adding one is a new module plus one line here.
"""

from . import autoround, awq, default, gptq_block, omniquant, rtn, smoothquant  # noqa: F401  (registration)
from .base import DEFAULT_METHOD, BlockJob, MemoryNeeds, Method, get_method, method_names, register

__all__ = ["DEFAULT_METHOD", "BlockJob", "MemoryNeeds", "Method", "get_method", "method_names", "register"]
