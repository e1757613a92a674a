"""PaletteLink server: one data plane (:class:`server.service.Service`) behind thin gRPC and HTTP
transports. Imports the core (``palettelink``) only; never the edge."""

__version__ = "0.1.0"
