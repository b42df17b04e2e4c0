from .splice import GraftedModule, Replacement, build_operator, splice
from .structure import StructuralEdit

__all__ = ["splice", "GraftedModule", "Replacement", "StructuralEdit", "build_operator"]
