"""Model zoos: specs, task families, architectures and the Ray Data builder."""

from .builder import BuildSummary, build_zoo, plan_tasks, zoo_layout
from .spec import ZooSpec

__all__ = ["ZooSpec", "build_zoo", "BuildSummary", "plan_tasks", "zoo_layout"]
