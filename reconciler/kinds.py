"""Every kind lockgate understands and the validator of each layer: the loader's registry.

Each layer owns its kinds and its cross-resource checks; this module only puts them together, so a new
layer is one line here and nothing else in the loader changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mesh import intent as mesh_intent
from mesh import validate as mesh_validate
from mesh.intent import ResourceBase
from mesh.validate import Finding
from policies import intent as policies_intent
from policies import validate as policies_validate
from rollouts import intent as rollouts_intent
from rollouts import validate as rollouts_validate

KINDS: dict[str, type[ResourceBase]] = {**mesh_intent.KINDS, **policies_intent.KINDS, **rollouts_intent.KINDS}
VALIDATORS: list[Callable[[Sequence[ResourceBase]], list[Finding]]] = [mesh_validate.validate,
                                                                       policies_validate.validate,
                                                                       rollouts_validate.validate]
