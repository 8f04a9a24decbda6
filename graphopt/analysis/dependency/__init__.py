"""Dependency analysis: which channels of which parameters must be pruned together (see analysis.py)."""

from graphopt.analysis.dependency.analysis import ChannelGroup, DependencyGraph, Member
from graphopt.analysis.dependency.walk import Walk, register_rule

__all__ = ["ChannelGroup", "DependencyGraph", "Member", "Walk", "register_rule"]
