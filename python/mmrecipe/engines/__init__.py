"""Where a build's sources are tokenized: on this machine (the builder itself), or on a
Ray cluster (`ray.py`, an optional extra). The builder decides what runs where; an engine
only runs the builder's per-source work and hands back its small results."""
