"""PaletteLink server: one data plane (:class:`server.service.Service`) behind thin gRPC and HTTP
transports. Imports the core (``palettelink``) only; never the edge."""

from palettelink import __version__  # one version for the package, its scripts and images

__all__ = ["__version__"]
