"""Operator tools behind ``palettelink`` subcommands: ``info`` (the bundles under a root), ``fuzz``
(malformed frames against the decoder or a server) and ``loadtest`` (many streams against a server).

They drive the library and the apps; nothing in the library, the server or the edge imports them
(the top floor of docs/architecture.md).
"""
