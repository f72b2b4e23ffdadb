"""Pure computation: no Qt, no napari. Torch is imported only by the modules that need it."""
