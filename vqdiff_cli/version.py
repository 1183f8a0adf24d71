"""The version of vqdiff, in one place below every other module: the package, `vqdiff --version`, image metadata,
cache manifests and benchmark reports read it."""

__version__ = "0.1.0"
