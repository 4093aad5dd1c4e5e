"""Reproductions of the paper's findings on Fashion-MNIST at coatnet_micro's scale: layouts, attention, norms.

definitions: the studies as data; runner: training rows through coatnet.train (in parallel processes on a GPU)
and the resumable JSON; speed: side-by-side timings; report: the markdown tables, plots and reading.
"""
from .definitions import LAYOUT_MODELS, STUDIES, Recipe, Study, Variant, get_study
from .report import write_report
from .runner import RunOptions, plan, read_rows, results_path, run_studies, study_of_rows

__all__ = ["LAYOUT_MODELS", "STUDIES", "Recipe", "RunOptions", "Study", "Variant", "get_study", "plan", "read_rows",
           "results_path", "run_studies", "study_of_rows", "write_report"]
