"""jlora's implementation, in stages that import only downward; see README.md beside this file."""
