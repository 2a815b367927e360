"""Pure render: intent + topology -> one xDS Snapshot per proxy (see `build.render`)."""

from mesh.render.build import *  # noqa: F403
