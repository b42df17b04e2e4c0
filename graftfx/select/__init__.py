from .select import Plan, RuleOutcome, contents, select

__all__ = ["select", "Plan", "RuleOutcome", "contents"]
