from .explain import RuleExplanation, explain
from .report import InspectReport, RegionRow, inspect
from .render import render_svg

__all__ = ["inspect", "InspectReport", "RegionRow", "explain", "RuleExplanation", "render_svg"]
