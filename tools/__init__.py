"""Command-line tools of topo-compiler (installed as ``topo_compiler.tools``)."""
