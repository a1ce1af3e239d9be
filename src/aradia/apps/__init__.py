"""Applications built on the library: each a package that may use every layer below it."""
