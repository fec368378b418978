"""Model zoos: specs, task families, architectures and the Ray Data builder.

Public API: ``ZooSpec`` (strict YAML spec), ``build_zoo(spec) -> BuildSummary``, ``plan_tasks``,
``zoo_layout``, ``retokenize_zoo`` (another block size / rule, nothing retrained); ``rayweights.zoo.families`` (tasks, data, base models), ``.architectures``
(registry), ``.editor`` (concept vocabulary and image editors).
"""

from .builder import BuildSummary, build_zoo, plan_tasks, zoo_layout
from .retokenize import retokenize_zoo
from .spec import ConceptOptions, HParamRanges, Resources, ZooSpec, read_zoo_spec

__all__ = ["ZooSpec", "ConceptOptions", "HParamRanges", "Resources", "build_zoo", "BuildSummary", "plan_tasks",
           "zoo_layout", "retokenize_zoo", "read_zoo_spec"]
