"""ffasynth: synthesise fluorescein angiograms from retinal photographs (StableFFA)."""

from ffasynth.errors import FFASynthError

__version__ = "0.1.0"
__all__ = ["FFASynthError", "__version__"]
