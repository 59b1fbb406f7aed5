"""nn.Modules only. Each model has a Config dataclass and a named size table with a ``tiny`` entry."""
