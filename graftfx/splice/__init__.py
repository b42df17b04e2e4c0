from .splice import GraftedModule, Replacement, build_operator, splice

__all__ = ["splice", "GraftedModule", "Replacement", "build_operator"]
