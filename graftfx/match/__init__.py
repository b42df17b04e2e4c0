from .match import match, match_all
from .region import CAUSAL_SELF_ATTENTION, CROSS_ATTENTION, JOINT_ATTENTION, MLP, SELF_ATTENTION, Region
from .report import Candidate, MatchReport

__all__ = ["match", "match_all", "Region", "MatchReport", "Candidate", "SELF_ATTENTION", "CAUSAL_SELF_ATTENTION",
           "CROSS_ATTENTION", "JOINT_ATTENTION", "MLP"]
