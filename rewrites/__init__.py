"""graftfx.rewrites: region patterns, the replacement-operator registry, and rule files."""
from .registry import (OPERATORS, PATTERNS, get_operator, get_pattern, operators, patterns,
                       register_operator, register_pattern)

__all__ = ["OPERATORS", "PATTERNS", "get_operator", "get_pattern", "operators", "patterns",
           "register_operator", "register_pattern"]
