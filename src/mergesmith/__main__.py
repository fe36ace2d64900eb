"""python -m mergesmith: the same as the mergesmith command."""

from mergesmith.cli import entry

entry()
