"""Intent written for another mesh, turned into lockgate intent files.

`istio` reads Istio's networking and security resources. Pure: file contents in, file texts and
`file:line` warnings out; the command (`lockgate import istio`) reads and writes the files.
"""

from reconciler.importers.istio import Imported, import_istio

__all__ = ["Imported", "import_istio"]
