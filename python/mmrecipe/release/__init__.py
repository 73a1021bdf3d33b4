"""Releases: the format and column vocabulary (`format`), writing (`write`), and reading
one back: `verify`, `stats`, `diff`."""
