"""Reproductions of the paper's findings on Fashion-MNIST at coatnet_micro's scale: layouts, attention, norms.

definitions: the studies as data; runner: training rows through coatnet.train (in parallel processes on a GPU)
and the resumable JSON; speed: side-by-side timings; report: the markdown tables, plots and reading.

The names below are imported on first use (PEP 562): `definitions` loads without torch, so that
`coatnet study --help` lists the studies in a fraction of a second.
"""
from ..utils import lazy_exports

_NAMES = {"LAYOUT_MODELS": "definitions", "STUDIES": "definitions", "Recipe": "definitions", "Study": "definitions",
          "Variant": "definitions", "get_study": "definitions", "write_report": "report", "RunOptions": "runner",
          "plan": "runner", "read_rows": "runner", "results_path": "runner", "run_studies": "runner",
          "study_of_rows": "runner"}

__all__ = sorted(_NAMES)


__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
