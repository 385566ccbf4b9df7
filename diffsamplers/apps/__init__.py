"""The jobs on top of the library: the model registry, the recipe parser, the command line, reports and tables."""
